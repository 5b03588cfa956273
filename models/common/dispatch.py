"""Token dispatchers: the one interface between a router's choices and the experts' grouped compute.

An experts module owns a dispatcher (`GroupedExperts.dispatcher`). Its forward is always
`routed = dispatcher.dispatch(x, indices, weights)` -> `y = run_grouped(routed.x, routed.offsets, routed.expert_ids,
routed.weights)` -> `dispatcher.combine(y, routed)`. Expert parallelism is "shard the weights and swap the
dispatcher": `LocalDispatcher` (this module) keeps every token on this rank; `parallel.ep_dispatch` holds the
all-to-all and DeepEP dispatchers, which move tokens between ranks and plug into the same two calls.

Contract (T local tokens, k experts per token, H hidden, E_local experts on this rank):
- `dispatch(x [T, H], indices [T, k] (global expert ids), weights [T, k]) -> RoutedRows`: `x [S, H]` rows sorted
  by LOCAL expert, `offsets [E_local]` int32 cumulative row counts, `expert_ids [S]` (local), `weights [S]` the
  routing weight of each row (the experts fold it into their activation), and `state` for `combine`.
- `combine(y [S, H], routed) -> [T, H]`: `out[t] = sum over t's (expert, weight) pairs of y`, i.e. the weighted sum
  over its k experts, wherever they ran. Autograd flows through every step, the weights included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backend import triton_ok

# ---------------------------------------------------------------- sorting (token, slot) pairs by expert


@dataclass
class DispatchPlan:
    perm: torch.Tensor  # [S] flat (token*K + slot) index of the i-th row in expert order
    inv_perm: torch.Tensor  # [S] position in expert order of flat pair p
    token_idx: torch.Tensor  # [S] token of the i-th sorted row
    sorted_ids: torch.Tensor  # [S] expert of the i-th sorted row
    offsets: torch.Tensor  # [E] int32 cumulative counts (end of each expert's rows)
    top_k: int


def dispatch_plan(indices: torch.Tensor, num_experts: int) -> DispatchPlan:
    top_k = indices.shape[-1]
    flat = indices.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds, right=True).to(torch.int32)
    inv_perm = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    return DispatchPlan(perm, inv_perm, perm // top_k, sorted_ids, offsets, top_k)


def _sum_slots(src: torch.Tensor, idx: torch.Tensor, top_k: int, fused: bool) -> torch.Tensor:
    """`out[t] = sum_k src[idx[t*K + k]]`; one Triton pass when `fused`, else index_select + sum."""
    if fused:
        from .kernels import gather_sum

        return gather_sum(src, idx, top_k)
    g = src.index_select(0, idx)
    return g.view(-1, top_k, g.shape[-1]).sum(dim=1)


def _sum_filled_slots(src: torch.Tensor, slots: torch.Tensor, top_k: int, fused: bool) -> torch.Tensor:
    """`_sum_slots` where an empty slot holds `len(src)`: a zero row. The Triton kernel reads it as zeros; the torch
    path appends the zero row (a copy of `src`)."""
    if fused:
        return _sum_slots(src, slots, top_k, fused)
    return _sum_slots(torch.cat([src, src.new_zeros(1, src.shape[1])]), slots, top_k, fused)


class _GatherRows(torch.autograd.Function):
    """x[token_idx]; backward sums the K copies of each token by gathering in (token, slot) order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_idx: torch.Tensor, inv_perm: torch.Tensor, top_k: int, fused: bool) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(inv_perm)
        ctx.top_k, ctx.fused = top_k, fused
        return x.index_select(0, token_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (inv_perm,) = ctx.saved_tensors
        return _sum_slots(grad, inv_perm, ctx.top_k, ctx.fused), None, None, None, None


class _CombineRows(torch.autograd.Function):
    """y (expert order) -> (token, slot) order, summed over slots; backward is y_grad = grad[token_idx]."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, inv_perm: torch.Tensor, token_idx: torch.Tensor, top_k: int, fused: bool) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(token_idx)
        return _sum_slots(y, inv_perm, top_k, fused)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (token_idx,) = ctx.saved_tensors
        return grad.index_select(0, token_idx), None, None, None, None


def gather_rows(x: torch.Tensor, plan: DispatchPlan, kernels: str = "torch") -> torch.Tensor:
    return _GatherRows.apply(x, plan.token_idx, plan.inv_perm, plan.top_k, triton_ok(x, kernels))


def combine_rows(y: torch.Tensor, plan: DispatchPlan, kernels: str = "torch") -> torch.Tensor:
    return _CombineRows.apply(y, plan.inv_perm, plan.token_idx, plan.top_k, triton_ok(y, kernels))


# ---------------------------------------------------------------- the interface


@dataclass
class RoutedRows:
    """Rows for this rank's experts, sorted by local expert, and what `combine` needs to send them home."""

    x: torch.Tensor
    offsets: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor | None
    state: Any
    source: torch.Tensor | None = None  # x == source.index_select(0, source_rows): what backward can re-gather x from
    source_rows: torch.Tensor | None = None
    padded: bool = False  # rows past offsets[-1] are padding: undefined values that only the grouped GEMM may skip


class TokenDispatcher:
    """Base of every dispatcher (see the module docstring for the contract)."""

    name = "base"

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> RoutedRows:
        raise NotImplementedError

    def combine(self, y: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(TokenDispatcher):
    """Every expert on this rank: one stable sort of the (token, slot) pairs, no communication, no host sync."""

    name = "local"

    def __init__(self, num_experts: int, kernels: str = "torch") -> None:
        self.num_experts = num_experts
        self.kernels = kernels  # "triton"/"auto": the fused gather-sum kernels of experts.gather_rows/combine_rows

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> RoutedRows:
        plan = dispatch_plan(indices, self.num_experts)
        xs = gather_rows(x, plan, self.kernels)
        row_weight = weights.reshape(-1).index_select(0, plan.perm).to(x.dtype)
        return RoutedRows(xs, plan.offsets, plan.sorted_ids, row_weight, plan, source=x, source_rows=plan.token_idx)

    def combine(self, y: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
        plan: DispatchPlan = routed.state
        return combine_rows(y, plan, self.kernels)


@dataclass
class SlotRows:
    """Rows that each belong to one of G groups of k slots (a received token's k experts, a token's ep ranks).

    `token[i]` is row i's group; `slots[g * k + j]` is the row in slot j of group g, or the number of rows (a zero
    row) when that slot is empty. Expanding (`gather_slots`) and summing back (`sum_slots`) are then both gathers:
    deterministic, no atomics, one fused Triton pass on CUDA.
    """

    token: torch.Tensor  # [S] group of each row
    slots: torch.Tensor  # [G * k]
    top_k: int
    fused: bool

    @staticmethod
    def build(group: torch.Tensor, slot: torch.Tensor, num_groups: int, k: int, fused: bool, valid: torch.Tensor | None = None) -> SlotRows:
        """Rows whose group and slot are `group [S]`, `slot [S]`; rows where `valid` is False fill no slot."""
        n = group.numel()
        slots = torch.full((num_groups * k + 1,), n, dtype=torch.long, device=group.device)
        target = group * k + slot
        if valid is not None:
            target = torch.where(valid, target, num_groups * k)  # the spare last slot, dropped below
        slots.scatter_(0, target, torch.arange(n, device=group.device))
        return SlotRows(group, slots[:-1], k, fused)


class _GatherSlots(torch.autograd.Function):
    """`x[token]`; backward sums each group's row gradients by gathering (no atomics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pairs: SlotRows) -> torch.Tensor:  # noqa: ANN001
        ctx.pairs = pairs
        return x.index_select(0, pairs.token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        p = ctx.pairs
        return _sum_filled_slots(grad, p.slots, p.top_k, p.fused), None


class _SumSlots(torch.autograd.Function):
    """Rows -> one row per group (a gather-sum over its k slots); backward is a gather."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, pairs: SlotRows) -> torch.Tensor:  # noqa: ANN001
        ctx.pairs = pairs
        return _sum_filled_slots(y, pairs.slots, pairs.top_k, pairs.fused)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad.index_select(0, ctx.pairs.token), None


def expand_received(
    recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_weights: torch.Tensor, num_local: int, num_pairs: int | None
) -> RoutedRows:
    """Tokens that arrived once per rank (`recv_x [R, H]`, `recv_idx [R, k]` local expert ids or -1 for experts on
    other ranks, `recv_weights [R, k]`) -> rows per (token, local expert) pair sorted by local expert. `num_pairs`
    (the count of ids >= 0, known on the host from the exchange that sized the transfer) spares a host sync.
    `sum_pairs` is the matching first half of combine. Both directions are gathers: deterministic, no atomics.

    `num_pairs=None` (the count is on the device only): all R x k slots become rows, the pairs first and in the same
    order as with the count, then padding rows (`RoutedRows.padded`) whose values are undefined, which the grouped
    GEMM skips (they lie past `offsets[-1]`), whose routing weight is 0 and whose gradients reach nothing: `combine`
    reads only the pairs' rows, and their weights' gradients are masked. Padding tokens (`recv_idx` all -1) may hold
    any bytes, NaN included."""
    k = recv_idx.shape[1]
    flat = recv_idx.reshape(-1)
    key = torch.where(flat >= 0, flat, num_local)  # other ranks' experts sort last and are cut off
    sorted_ids, perm = torch.sort(key, stable=True)
    if num_pairs is not None:
        sorted_ids, perm = sorted_ids[:num_pairs], perm[:num_pairs]
    bounds = torch.arange(num_local, device=flat.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds, right=True).to(torch.int32)
    valid = None if num_pairs is not None else sorted_ids < num_local
    pairs = SlotRows.build(perm // k, perm % k, recv_x.shape[0], k, triton_ok(recv_x, "auto"), valid)
    xs = gather_slots(recv_x, pairs)
    row_weight = recv_weights.reshape(-1).index_select(0, perm)
    if valid is not None:  # padding rows: weight 0, and no gradient flows back into the (undefined) received weights
        row_weight = torch.where(valid, row_weight, torch.zeros((), dtype=row_weight.dtype, device=row_weight.device))
        sorted_ids = sorted_ids.clamp_max(num_local - 1)  # in range for per-expert biases; the rows stay padding
    return RoutedRows(xs, offsets, sorted_ids, row_weight.to(recv_x.dtype), pairs, source=recv_x, source_rows=pairs.token,
                      padded=valid is not None)


def gather_slots(x: torch.Tensor, rows: SlotRows) -> torch.Tensor:
    """`x[rows.token]` (one row per slot in use); its backward sums by gathering."""
    return _GatherSlots.apply(x, rows)


def sum_slots(y: torch.Tensor, rows: SlotRows) -> torch.Tensor:
    """One row per group: the sum of its rows (weighted expert outputs per pair -> one row per received token)."""
    return _SumSlots.apply(y, rows)
