"""Routed experts as grouped GEMMs over tokens sorted by expert (one permutation shared by both projections).

Layouts (transformers v5, fused): `layout="concat"`: `gate_up_proj [E, 2I, H]` (rows [:I] gate, [I:] up),
`down_proj [E, H, I]` (F.linear convention); `layout="gpt_oss"`: `gate_up_proj [E, H, 2I]` with gate/up interleaved
along the last dim (gate = even columns), `gate_up_proj_bias [E, 2I]`, `down_proj [E, I, H]`, `down_proj_bias [E, H]`.

`GroupedExperts.forward(x [T, H], indices [T, K], weights [T, K]) -> [T, H]` computes
`sum_k weights[t, k] * expert_{indices[t, k]}(x[t])` in three steps, the same on one rank and under expert parallelism:
1. `self.dispatcher.dispatch` (models/common/dispatch.py): rows sorted by (local) expert, int32 `offsets`, and each
   row's routing weight. `LocalDispatcher` (the default) sorts on this rank with no host sync; expert parallelism
   swaps in an all-to-all or DeepEP dispatcher (parallel/ep_dispatch.py) and keeps only this rank's `Shard(0)`
   slice of the weights. Nothing else changes.
2. `run_grouped`, the one compute path: `grouped_linear` (gate_up) -> activation with the routing weight folded in
   (`a = act(gate) * up * w`, exact since the down projection is linear; a bias is scaled accordingly) ->
   `grouped_linear` (down).
3. `self.dispatcher.combine`: the weighted rows summed back into their tokens.
`grouped_linear` back-ends: "grouped_mm" (`torch._grouped_mm`, offsets as a device tensor), "padded" (loop-free:
rows scattered into per-expert buckets of the largest count, one batched bmm; one host sync for that count),
"loop" (reference loop over experts); "auto" takes grouped_mm when the call's shapes/dtype allow it, else padded. `run_grouped(x_sorted, offsets, sorted_ids)` runs the experts on rows that
are already sorted (the expert-parallel dispatcher's entry point).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import triton_ok
from .dispatch import DispatchPlan, LocalDispatcher, TokenDispatcher, combine_rows, dispatch_plan, gather_rows  # noqa: F401 - re-exported
from .recompute import RecomputeInBackward, regather

# ---------------------------------------------------------------- grouped GEMM back-ends


def _grouped_mm_fn() -> Callable:
    return getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


def grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped GEMM needs 16-byte aligned strides and base pointers, and bf16 on CUDA."""
    if x.is_cuda and x.dtype != torch.bfloat16:
        return False
    es = x.element_size()
    if (x.shape[1] * es) % 16 or (w.shape[2] * es) % 16:  # input rows, output rows (and the backward's)
        return False
    return all(t.data_ptr() % 16 == 0 and all(s == 1 or s * es % 16 == 0 for s in t.stride()) for t in (x, w))


def _padded_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    cap = int(counts.max()) if counts.numel() else 0  # the one host sync of this path
    if x.shape[0] == 0 or cap == 0:
        return x.new_zeros(x.shape[0], w.shape[2])
    starts = offsets.long() - counts
    pos = torch.arange(x.shape[0], device=x.device) - starts[sorted_ids]
    buckets = x.new_zeros(w.shape[0], cap, x.shape[1]).index_put((sorted_ids, pos), x)
    return torch.bmm(buckets, w)[sorted_ids, pos]


def _loop_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    outs, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            outs.append(x[start:end] @ w[e])
        start = end
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[2])


def grouped_linear(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sorted_ids: torch.Tensor, impl: str = "grouped_mm"
) -> torch.Tensor:
    """`x [S, in]` sorted by expert, `w [E, in, out]` (any strides) -> `[S, out]`, row i uses `w[sorted_ids[i]]`."""
    if impl in ("grouped_mm", "auto") and grouped_mm_ok(x, w):
        return _grouped_mm_fn()(x, w.to(x.dtype), offs=offsets)
    if impl == "grouped_mm":
        raise ValueError(
            f"experts='grouped_mm' needs 16-byte aligned rows (in={x.shape[1]}, out={w.shape[2]}, {x.dtype}) and "
            "bf16 on CUDA: use experts='padded' or 'auto'"
        )
    if impl == "loop":
        return _loop_mm(x, w.to(x.dtype), offsets)
    return _padded_mm(x, w.to(x.dtype), offsets, sorted_ids)


# ---------------------------------------------------------------- activations


def swiglu(h: torch.Tensor, row_weight: torch.Tensor | None, act: Callable = F.silu, impl: str = "torch") -> torch.Tensor:
    """`h [S, 2I]` = [gate | up] -> `act(gate) * up * row_weight[:, None]`."""
    if triton_ok(h, impl) and act is F.silu:
        from .kernels import swiglu_weighted

        return swiglu_weighted(h, row_weight)
    gate, up = h.chunk(2, dim=-1)
    out = act(gate) * up
    return out if row_weight is None else out * row_weight[:, None]


def gpt_oss_glu(h: torch.Tensor, row_weight: torch.Tensor | None, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS clamped SwiGLU on interleaved columns: `(clamp(up) + 1) * g * sigmoid(alpha * g)`, g = clamp(gate)."""
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    out = (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return out if row_weight is None else out * row_weight[:, None]


# ---------------------------------------------------------------- the module


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        act: str = "silu",
        layout: str = "concat",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        impl: str = "grouped_mm",
        swiglu_impl: str = "torch",
        recompute: bool = False,
    ) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.layout = layout
        e, h, i = num_experts, hidden_size, intermediate_size
        if layout == "concat":
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
            self.down_proj = nn.Parameter(torch.empty(e, h, i))
        elif layout == "gpt_oss":
            self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))
            self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i))
            self.down_proj = nn.Parameter(torch.empty(e, i, h))
            self.down_proj_bias = nn.Parameter(torch.empty(e, h))
        else:
            raise ValueError(f"unknown experts layout {layout!r}")
        self.act_name = act
        self.act_fn = F.silu if act == "silu" else ACT2FN[act]
        self.alpha, self.limit = swiglu_alpha, swiglu_limit
        self.impl, self.swiglu_impl = impl, swiglu_impl
        self.recompute = recompute  # rebuild the gathered rows and the activation in backward (models/common/recompute.py)
        self.dispatcher: TokenDispatcher = LocalDispatcher(num_experts, swiglu_impl)
        self.grad_scale = 1.0  # multiplies the weights' gradients (expert parallelism: 1/ep, see parallel/)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, layout={self.layout}, impl={self.impl}"

    def run_grouped(
        self,
        x_sorted: torch.Tensor,
        offsets: torch.Tensor,
        sorted_ids: torch.Tensor,
        row_weight: torch.Tensor | None = None,
        hooks: RecomputeInBackward | None = None,
    ) -> torch.Tensor:
        """Experts on rows already sorted by expert: `[S, H] -> [S, H]`, scaled by `row_weight [S]` if given.

        A rank may hold no experts (torch.chunk's uneven `Shard(0)` rule) or receive no rows: the weights and the
        rows still enter the autograd graph, so every rank reaches the same collectives in backward. With `hooks`,
        the activation fed to the down projection is rebuilt in backward instead of saved.
        """
        gate_up, down = self.gate_up_proj, self.down_proj
        if self.grad_scale != 1.0:
            gate_up, down = _GradScale.apply(gate_up, self.grad_scale), _GradScale.apply(down, self.grad_scale)
        if gate_up.shape[0] == 0:
            keep = (x_sorted.sum() + sum(p.sum() for p in self.parameters()).to(x_sorted.dtype)) * 0
            return x_sorted.new_zeros((x_sorted.shape[0], self.hidden_size)) + keep
        if self.layout == "concat":
            w1, w2 = gate_up.transpose(1, 2), down.transpose(1, 2)
        else:
            w1, w2 = gate_up, down
        h = grouped_linear(x_sorted, w1, offsets, sorted_ids, self.impl)
        if self.layout == "concat":
            a = self._activation(h, row_weight, hooks)
            return grouped_linear(a, w2, offsets, sorted_ids, self.impl)
        h = h + self.gate_up_proj_bias[sorted_ids].to(h.dtype)
        a = self._activation(h, row_weight, hooks)
        y = grouped_linear(a, w2, offsets, sorted_ids, self.impl)
        bias = self.down_proj_bias[sorted_ids].to(y.dtype)
        return y + (bias if row_weight is None else bias * row_weight[:, None])

    def _activation(self, h: torch.Tensor, row_weight: torch.Tensor | None, hooks: RecomputeInBackward | None) -> torch.Tensor:
        def act(h: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            if self.layout == "concat":
                return swiglu(h, w, self.act_fn, self.swiglu_impl)
            return gpt_oss_glu(h, w, self.alpha, self.limit)

        a = act(h, row_weight)
        if hooks is not None:
            w = None if row_weight is None else row_weight.detach()
            h_kept = h.detach()  # the activation's own backward keeps h
            hooks.rebuild(a, lambda: act(h_kept, w))
        return a

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        routed = self.dispatcher.dispatch(x, indices, weights.to(x.dtype))
        w1 = self.gate_up_proj.transpose(1, 2) if self.layout == "concat" else self.gate_up_proj
        if routed.padded and not (self.impl in ("grouped_mm", "auto") and grouped_mm_ok(routed.x, w1)):
            raise ValueError(f"dispatcher {self.dispatcher.name!r} pads its rows, which only experts='grouped_mm' skips "
                             f"(this layer runs {self.impl!r} on {routed.x.dtype}); use --dispatcher deepep")
        if not (self.recompute and torch.is_grad_enabled()):
            y = self.run_grouped(routed.x, routed.offsets, routed.expert_ids, routed.weights)
            return self.dispatcher.combine(y, routed)
        hooks = RecomputeInBackward()
        with hooks:
            if routed.source is not None:
                hooks.rebuild(routed.x, regather(routed.source, routed.source_rows))
            y = self.run_grouped(routed.x, routed.offsets, routed.expert_ids, routed.weights, hooks)
        return self.dispatcher.combine(y, routed)


class _GradScale(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205
        return g * ctx.scale, None
