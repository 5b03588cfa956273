"""Rebuild large saved activations in backward instead of keeping them (`BackendConfig(expert_recompute=True)`).

Contract: `RecomputeInBackward()` is a `saved_tensors_hooks` context. Inside it, `rebuild(tensor, recipe)` registers
a tensor that autograd would otherwise keep for backward and a function that rebuilds it, bit for bit, from tensors
that are kept anyway (or are much smaller). When an op inside the context saves a registered tensor (the same
storage, offset, shape, strides and dtype), the recipe is stored in its place and run under `no_grad` when backward
needs the tensor; it is freed again once that op's backward is done. Every other saved tensor goes to the hooks that
were active outside the context (CPU offload, a measurement), or is kept as autograd would keep it.

The experts use it for their two largest saved tensors: the rows gathered by expert (`[S, H]`, S = tokens x top-k,
rebuilt by re-gathering the dispatcher's compact source) and the activation fed to the down projection (`[S, I]`,
rebuilt from the gate_up output that the activation's own backward keeps). Recipes are deterministic gathers and
element-wise kernels, so gradients are bit-identical to keeping the tensors. A source must not change after
forward: the dispatchers' sources are fresh tensors (the layer input; `_a2a`'s `new_empty`; DeepEP 1.2.1's
`intranode_dispatch` allocates `recv_x` with `torch::empty`), and `regather` refuses a source modified in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _Recipe:
    __slots__ = ("build",)

    def __init__(self, build: Callable[[], torch.Tensor]) -> None:
        self.build = build


class _Outer:
    __slots__ = ("packed",)

    def __init__(self, packed: object) -> None:
        self.packed = packed


def _outer_hooks() -> tuple[Callable, Callable] | None:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


class RecomputeInBackward(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that store a recipe instead of each registered tensor (see the module docstring)."""

    def __init__(self) -> None:
        self._recipes: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = []
        self._outer = _outer_hooks()
        super().__init__(self._pack, self._unpack)

    def rebuild(self, tensor: torch.Tensor, recipe: Callable[[], torch.Tensor]) -> None:
        self._recipes.append((tensor, recipe))

    def __exit__(self, *exc: object) -> None:
        self._recipes.clear()  # the graph keeps these hooks: it must not keep the registered tensors through them
        super().__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> object:
        for ref, recipe in self._recipes:
            if _same_view(t, ref):
                return _Recipe(recipe)
        return _Outer(self._outer[0](t)) if self._outer is not None else t

    def _unpack(self, packed: object) -> torch.Tensor:
        if isinstance(packed, _Recipe):
            with torch.no_grad():
                return packed.build()
        if isinstance(packed, _Outer):
            return self._outer[1](packed.packed)  # type: ignore[index]
        return packed  # type: ignore[return-value]


def regather(source: torch.Tensor, rows: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A recipe for `source.index_select(0, rows)`; refuses to run if `source` was modified in place since."""
    source, version = source.detach(), source._version

    def build() -> torch.Tensor:
        if source._version != version:
            raise RuntimeError("the experts' source rows were modified in place after forward; set BackendConfig(expert_recompute=False)")
        return source.index_select(0, rows)

    return build
