"""Token dispatch for expert parallelism: route, permute, all-to-all, grouped experts, send back, combine.

Contract (shapes per rank; T local tokens, H hidden, k experts per token, E global experts, ep ranks):
- `x [T, H]`, `topk_idx [T, k]` (global expert ids, int64), `topk_weight [T, k]`.
- `experts_fn(x_grouped [N, H], counts [n_local])` runs this rank's experts on tokens sorted by LOCAL expert
  (`counts[j]` rows for local expert j, in order) and returns `[N, H_out]`.
- Returns `out [T, H_out] = sum_k topk_weight[t, k] * expert_{topk_idx[t, k]}(x[t])`, the same value (up to float
  summation order) as running every expert on one rank. Autograd flows through every step (both all-to-alls).
Expert ownership follows DTensor's `Shard(0)` rule on the ep group (`torch.chunk`: the first ranks get
`ceil(E/ep)` experts; uneven counts work). A `Dispatcher` subclass (e.g. DeepEP) replaces `dispatch`/`combine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expert_bounds(num_experts: int, ep: int) -> list[int]:
    """Start index of each rank's experts plus the end: rank r owns `[b[r], b[r+1])` (torch.chunk rule)."""
    size = math.ceil(num_experts / ep)
    return [min(r * size, num_experts) for r in range(ep)] + [num_experts]


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with variable splits whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        out_splits, in_splits = ctx.splits
        gin = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(gin, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return gin, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class DispatchState:
    """What `combine` needs to undo `dispatch`."""

    pair_order: torch.Tensor  # (token, k) pairs sorted by global expert: pair_order[i] = flat pair index
    local_order: torch.Tensor | None  # received rows sorted by local expert
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int
    topk_weight: torch.Tensor


class Dispatcher:
    """Interface: `dispatch` sends tokens to the ranks owning their experts; `combine` brings results back."""

    name = "base"

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        raise NotImplementedError

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts_fn: ExpertsFn) -> torch.Tensor:
        xs, counts, state = self.dispatch(x, topk_idx, topk_weight)
        return self.combine(experts_fn(xs, counts), state)


def _combine_pairs(y_pairs_sorted: torch.Tensor, state: DispatchState) -> torch.Tensor:
    """Weight each (token, k) pair's expert output and sum into its token (fp32 accumulation)."""
    k = state.topk_weight.shape[1]
    w = state.topk_weight.reshape(-1)[state.pair_order].unsqueeze(1)
    weighted = (y_pairs_sorted.float() * w.float()).to(y_pairs_sorted.dtype)
    out = y_pairs_sorted.new_zeros((state.num_tokens, y_pairs_sorted.shape[1]))
    return out.index_add(0, state.pair_order // k, weighted)


class LocalDispatcher(Dispatcher):
    """All experts on this rank (ep = 1): sort (token, k) pairs by expert, no communication."""

    name = "local"

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x, topk_idx, topk_weight):  # noqa: ANN001, ANN201
        T, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        state = DispatchState(order, None, [], [], T, topk_weight)
        return x[order // k], counts, state

    def combine(self, y, state):  # noqa: ANN001, ANN201
        return _combine_pairs(y, state)


class AllToAllDispatcher(Dispatcher):
    """Expert parallelism over `group` with `dist.all_to_all_single` (NCCL on GPUs, gloo on CPUs)."""

    name = "alltoall"

    def __init__(self, num_experts: int, group=None) -> None:  # noqa: ANN001
        self.num_experts = num_experts
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bounds = expert_bounds(num_experts, self.ep)
        self.local_experts = self.bounds[self.rank + 1] - self.bounds[self.rank]

    def dispatch(self, x, topk_idx, topk_weight):  # noqa: ANN001, ANN201
        T, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # tokens per global expert, then exchanged so every rank learns how many rows each source sends per local expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        per_rank = torch.stack([counts[self.bounds[r] : self.bounds[r + 1]].sum() for r in range(self.ep)])
        width = max(self.bounds[r + 1] - self.bounds[r] for r in range(self.ep))
        send_matrix = torch.zeros(self.ep, width, dtype=counts.dtype, device=counts.device)
        for r in range(self.ep):
            n = self.bounds[r + 1] - self.bounds[r]
            send_matrix[r, :n] = counts[self.bounds[r] : self.bounds[r + 1]]
        recv_matrix = torch.empty_like(send_matrix)
        dist.all_to_all_single(recv_matrix, send_matrix, group=self.group)  # [src rank, local expert]
        recv_matrix = recv_matrix[:, : self.local_experts]
        send_splits = per_rank.tolist()  # one host sync per layer: all_to_all needs split sizes on the host
        recv_splits = recv_matrix.sum(1).tolist()
        received = all_to_all(x[order // k], recv_splits, send_splits, self.group)
        # rows arrive grouped by source rank, each source's rows sorted by expert: regroup by local expert
        local_ids = torch.arange(self.local_experts, device=x.device).repeat(self.ep)
        row_expert = torch.repeat_interleave(local_ids, recv_matrix.reshape(-1))
        local_order = torch.argsort(row_expert, stable=True)
        state = DispatchState(order, local_order, send_splits, recv_splits, T, topk_weight)
        return received[local_order], recv_matrix.sum(0), state

    def combine(self, y, state):  # noqa: ANN001, ANN201
        unsorted = torch.empty_like(y).index_copy(0, state.local_order, y) if y.shape[0] else y
        back = all_to_all(unsorted, state.send_splits, state.recv_splits, self.group)
        return _combine_pairs(back, state)
