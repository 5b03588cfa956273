"""AdamW stepped inside backward: each parameter's update runs as soon as its gradient is complete.

Contract: `OverlappedAdamW(params, lr=..., betas=..., eps=..., weight_decay=..., fused=...)` holds one
`torch.optim.AdamW` per parameter (the same kernel, fused on CUDA, and the same per-element arithmetic as one AdamW
over all of them, so parameters and moments come out bit-identical; `tests/test_train_optim.py` checks that). A
post-accumulate-grad hook on every parameter steps that parameter's optimizer and frees its gradient the moment
autograd has accumulated it. On CUDA the update is queued on a side stream that first waits for the work that
produced the gradient, so the memory-bound AdamW kernels of early-finished layers (lm_head, the last decoder layers)
run while backward is still computing the earlier layers, and each gradient is freed right after its update, which
lowers peak memory. `step()` makes the current stream wait for those updates (call it after `backward()`, before the
next forward); `zero_grad()` is a no-op because gradients never outlive their update.

What it excludes, by construction: anything that needs all gradients before any update (global-norm gradient
clipping, gradient accumulation over micro-batches, gradients reduced after backward as FSDP does); the trainer
uses it on one rank only and says so when asked for more. `param_groups` lists every per-parameter group, so a
learning-rate schedule written for `torch.optim.Optimizer` works unchanged; `state` maps parameter -> AdamW state
like `Optimizer.state` (read and assign), for checkpoints.

Deferring the first layers to the next forward (`defer_until_forward(modules)`): the gradients of the
layers nearest the input arrive last in backward, yet the next forward needs those layers first, so their updates
would sit at the end of the step. For the listed modules (given in forward order: embeddings, then the first decoder
layers) the hooks keep the gradient instead; `step()` queues those updates on the side stream in forward order, an
event after each module, and a forward pre-hook on each module makes the current stream wait for that module's
event only. Their AdamW work then overlaps the next forward instead of following backward. The modules must be the
ones the forward actually calls (after any CUDA-graph capture that replaces them); a step whose deferred updates
were not waited for by the next forward raises. Without a side stream (CPU) the deferred updates simply run in
`step()`. `finish()` waits for everything: call it before reading parameters outside a forward (saving,
evaluation); reading `state` calls it too.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import torch


class _StateView(MutableMapping):
    """`Optimizer.state`-like view over the per-parameter optimizers: parameter -> its AdamW state dict."""

    def __init__(self, owner: OverlappedAdamW) -> None:
        self._owner = owner

    def _opt(self, p: torch.Tensor) -> torch.optim.Optimizer:
        try:
            return self._owner.optimizers[p]
        except KeyError:
            raise KeyError("not a parameter of this optimizer") from None

    def __getitem__(self, p: torch.Tensor) -> dict:
        self._owner.finish()
        st = self._opt(p).state
        if p not in st:
            raise KeyError("no state yet for this parameter")
        return st[p]

    def __setitem__(self, p: torch.Tensor, value: dict) -> None:
        self._owner.finish()
        self._opt(p).state[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self._opt(p).state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p, o in self._owner.optimizers.items() if p in o.state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class OverlappedAdamW:
    """AdamW whose per-parameter steps run during backward (see the module docstring)."""

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, fused: bool | None = None, side_stream: bool = True,
                 stream_priority: int = 0) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("OverlappedAdamW got no parameters that require grad")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("OverlappedAdamW got the same parameter twice")
        kw: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if fused is not None:
            kw["fused"] = fused
            kw["foreach"] = False if fused else None
        self.optimizers: dict[torch.Tensor, torch.optim.AdamW] = {p: torch.optim.AdamW([p], **kw) for p in params}
        self.defaults = dict(next(iter(self.optimizers.values())).defaults)
        cuda = params[0].is_cuda
        self.stream = torch.cuda.Stream(device=params[0].device, priority=stream_priority) if cuda and side_stream else None
        self.pending = False
        self.enabled = True
        self.state = _StateView(self)
        self.deferred: list[tuple[torch.nn.Module, list[torch.Tensor]]] = []  # (module, its parameters), forward order
        self._deferred_params: set[torch.Tensor] = set()
        self._waiting: dict[int, torch.cuda.Event] = {}  # id(module) -> event after its deferred updates
        # the hooks hold the optimizer weakly: a strong reference from every parameter back to it would be a cycle
        # through autograd's C++ hook tables that Python's gc cannot see, and model + optimizer would never be freed
        self._me = me = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            opt = me()
            if opt is not None:
                opt._on_grad(p)

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in params]

    @property
    def param_groups(self) -> list[dict]:
        return [o.param_groups[0] for o in self.optimizers.values()]

    def defer_until_forward(self, modules: Iterable[torch.nn.Module]) -> None:
        """Defer the updates of these modules' parameters (forward order) to `step()`; see the module docstring."""
        me = self._me
        for m in modules:
            ps = [p for p in m.parameters() if p in self.optimizers and p not in self._deferred_params]
            if not ps:
                continue
            self.deferred.append((m, ps))
            self._deferred_params.update(ps)
            if self.stream is None:  # on one stream the deferred updates simply run in step(), in order
                continue

            def wait(module: torch.nn.Module, args: object) -> None:
                opt = me()
                if opt is not None:
                    ev = opt._waiting.pop(id(module), None)
                    if ev is not None:
                        torch.cuda.current_stream(opt.stream.device).wait_event(ev)

            self._hooks.append(m.register_forward_pre_hook(wait))

    def _update(self, p: torch.Tensor) -> None:
        """Step `p` (on the side stream when called inside its context) and drop its gradient."""
        self.optimizers[p].step()
        if self.stream is not None:
            # the gradient was made on the current stream and is read on the side stream: keep its memory from
            # being reused until the update has run
            p.grad.record_stream(self.stream)
        p.grad = None

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.enabled or p.grad is None or p in self._deferred_params:
            return
        if self.stream is None:
            self._update(p)
            return
        self.stream.wait_stream(torch.cuda.current_stream(p.device))
        with torch.cuda.stream(self.stream):
            self._update(p)
        self.pending = True

    def step(self) -> None:
        """Finish the step: the current stream waits for the updates queued during backward; deferred updates are
        queued in forward order for the next forward to wait on, module by module."""
        if self.stream is None:
            for _module, ps in self.deferred:
                for p in ps:
                    if p.grad is not None:
                        self._update(p)
            return
        current = torch.cuda.current_stream(self.stream.device)
        if self._waiting:
            self._waiting.clear()
            raise RuntimeError("OverlappedAdamW: the forward did not run the modules given to defer_until_forward, so it "
                               "did not wait for their updates; pass the modules the forward calls (after graph capture)")
        if self.pending:
            current.wait_stream(self.stream)
            self.pending = False
        if not self.deferred:
            return
        self.stream.wait_stream(current)  # backward has produced the deferred gradients
        with torch.cuda.stream(self.stream):
            for module, ps in self.deferred:
                stepped = [p for p in ps if p.grad is not None]
                for p in stepped:
                    self._update(p)
                if stepped:
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    self._waiting[id(module)] = ev

    def finish(self) -> None:
        """Wait (on the current stream) for every queued update, deferred ones included."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self._waiting.clear()
            self.pending = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed by their update; this only clears any left by a backward run with `enabled=False`."""
        for p in self.optimizers:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def input_side_modules(model: torch.nn.Module, layers: int | None = None) -> list[torch.nn.Module]:
    """The modules to give `defer_until_forward` for a causal LM laid out as `model.model.embed_tokens` +
    `model.model.layers` (the zoo's and transformers' layout): the embeddings and the first `layers` decoder layers
    (default: half of them), in forward order."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "embed_tokens") or not hasattr(inner, "layers"):
        raise ValueError("input_side_modules needs a model with .model.embed_tokens and .model.layers; list the modules yourself")
    n = len(inner.layers) // 2 if layers is None else layers
    return [inner.embed_tokens, *list(inner.layers)[:n]]



class _SplitState(MutableMapping):
    """`Optimizer.state`-like view over the two optimizers of `SplitOverlappedAdamW`."""

    def __init__(self, owner: SplitOverlappedAdamW) -> None:
        self._owner = owner

    def _state(self, p: torch.Tensor) -> MutableMapping:
        o = self._owner
        if p in o.overlapped.optimizers:
            return o.overlapped.state
        if p in o.dense_params:
            return o.dense.state
        raise KeyError("not a parameter of this optimizer")

    def __getitem__(self, p: torch.Tensor) -> dict:
        st = self._state(p)
        if p not in st:  # AdamW.state is a defaultdict: a lookup must not create an empty entry
            raise KeyError("no state yet for this parameter")
        return st[p]

    def __setitem__(self, p: torch.Tensor, value: dict) -> None:
        self._state(p)[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self._state(p)[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self._owner.overlapped.state
        yield from self._owner.dense.state

    def __len__(self) -> int:
        return len(self._owner.overlapped.state) + len(self._owner.dense.state)


class SplitOverlappedAdamW:
    """AdamW with the update inside backward where it can be: `overlapped` (an `OverlappedAdamW`) steps the
    plain-tensor parameters (all of them on one rank; the experts when ep equals the world size: nothing reduces
    their gradients, so each is complete the moment autograd accumulates it), during backward on its side stream; `dense` (one fused/foreach AdamW) steps the FSDP2 (DTensor) parameters in `step()`, after FSDP has
    reduce-scattered their gradients, on the current stream, so the next forward's all-gathers read updated shards.
    Both run AdamW's per-element arithmetic, so the result equals one AdamW over all parameters bit for bit
    (tests/test_ep_overlap_optimizer.py). Same interface as `OverlappedAdamW` (`param_groups`, `state`, `defaults`,
    `step`, `zero_grad`, `finish`)."""

    def __init__(self, plain: list[torch.Tensor], dense: list[torch.Tensor], **kw: Any) -> None:
        self.overlapped = OverlappedAdamW(plain, **kw)
        fused = kw.pop("fused", None)
        self.dense_params = set(dense)
        self.dense = torch.optim.AdamW(dense, **kw, fused=fused, foreach=None if fused else True) if dense else None
        self.defaults = dict(self.overlapped.defaults)
        self.state = _SplitState(self)

    @property
    def param_groups(self) -> list[dict]:
        return self.overlapped.param_groups + (self.dense.param_groups if self.dense is not None else [])

    def step(self) -> None:
        self.overlapped.step()
        if self.dense is not None:
            self.dense.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.overlapped.zero_grad(set_to_none)
        if self.dense is not None:
            self.dense.zero_grad(set_to_none)

    def finish(self) -> None:
        self.overlapped.finish()
