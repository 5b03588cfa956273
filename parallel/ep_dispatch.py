"""Expert-parallel token dispatchers: each token travels once to every rank that holds one of its experts.

Both dispatchers implement `models.common.dispatch.TokenDispatcher` (dispatch -> the experts' grouped compute ->
combine) over an ep process group; expert ownership follows DTensor's `Shard(0)` rule (`expert_bounds`, the
torch.chunk split: the first ranks get ceil(E/ep) experts; uneven counts work for the all-to-all dispatcher).

- `AllToAllDispatcher` (NCCL on GPUs, gloo on CPUs): a token is sent once per destination rank (not once per
  (token, expert) pair: with top-8 over 2 ranks that is at most 2 rows instead of 8), with its k expert ids
  (translated to the destination's local ids, -1 where another rank owns the expert) and weights. The receiver
  expands each token to its local (token, expert) pairs, runs the experts with the weight folded in, sums a token's
  pairs into one row, and sends one row back per (token, rank); the source adds up its ranks' rows.
- `DeepEPDispatcher`: the same exchange through DeepEP's intranode NVLink kernels (`deep_ep.Buffer.dispatch` /
  `combine`, which deduplicate the same way), wrapped in autograd functions whose backward is the other kernel.

Host syncs, and why they remain: the all-to-all needs its split sizes on the host, so `AllToAllDispatcher.dispatch`
reads one small tensor per layer (rows to send, rows and (token, expert) pairs to receive, per rank) in one `.tolist()`
after one tiny all-to-all; combine and both backward passes reuse those sizes (no further sync). DeepEP's
dispatch waits on the host for the received-token count (its notify step) for the same reason. Nothing else syncs.
`deepep_static` (`DeepEPDispatcher(max_tokens=N)`) removes that last one with DeepEP's `num_worst_tokens`: its buffers
and rows are sized for the worst case (every rank's N tokens arrive, each at k local experts) and padded, so it
trades memory for a step with no EP host sync; values and gradients equal `deepep`'s.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..convert.sharding import chunk_range
from ..models.backend import triton_ok
from ..models.common.dispatch import RoutedRows, SlotRows, TokenDispatcher, expand_received, gather_slots, sum_slots


class DispatcherError(ValueError):
    """A dispatcher that cannot run here (one line: what is missing and what to use instead)."""


def expert_bounds(num_experts: int, ep: int) -> list[int]:
    """Start index of each rank's experts plus the end: rank r owns `[b[r], b[r+1])` (`convert.sharding`'s rule)."""
    return [chunk_range(num_experts, ep, r)[0] for r in range(ep)] + [num_experts]


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with variable splits whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        out_splits, in_splits = ctx.splits
        gin = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(gin, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return gin, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAllRowsAndMeta(torch.autograd.Function):
    """Rows and their (ids, weights) in one autograd node: forward sends both, backward returns both gradients in a
    fixed order. Every rank runs this node's backward exactly once (absent gradients are zeros), so the backward
    collectives line up on every rank, also one that holds no experts or receives no rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, meta: torch.Tensor, out_splits: list[int], in_splits: list[int], group):  # noqa: ANN001, ANN205
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _a2a(x, out_splits, in_splits, group), _a2a(meta, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g_x: torch.Tensor, g_meta: torch.Tensor):  # noqa: ANN001, ANN205
        out_splits, in_splits = ctx.splits
        return _a2a(g_x, in_splits, out_splits, ctx.group), _a2a(g_meta, in_splits, out_splits, ctx.group), None, None, None


class _SentRows:
    """What `AllToAllDispatcher.combine` needs: the sent rows (token, rank slots), the splits, the receiver's pairs."""

    def __init__(self, sent: SlotRows, send: list[int], recv: list[int], pairs: SlotRows) -> None:
        self.sent, self.send, self.recv, self.pairs = sent, send, recv, pairs


class AllToAllDispatcher(TokenDispatcher):
    """Expert parallelism over `group` with `dist.all_to_all_single`, one row per (token, destination rank)."""

    name = "alltoall"

    def __init__(self, num_experts: int, group=None) -> None:  # noqa: ANN001
        self.num_experts, self.group = num_experts, group
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.bounds = expert_bounds(num_experts, self.ep)
        self.num_local = self.bounds[self.rank + 1] - self.bounds[self.rank]
        self._bounds_t: torch.Tensor | None = None

    def _owner(self, indices: torch.Tensor) -> torch.Tensor:
        if self._bounds_t is None or self._bounds_t.device != indices.device:
            self._bounds_t = torch.tensor(self.bounds, device=indices.device, dtype=indices.dtype)
        return torch.bucketize(indices, self._bounds_t[1:-1], right=True)  # rank owning each chosen expert

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> RoutedRows:
        T, k = indices.shape
        owner = self._owner(indices)
        in_rank = torch.zeros(T, self.ep, dtype=torch.bool, device=x.device).scatter_(1, owner, True)
        pairs_per_rank = torch.bincount(owner.reshape(-1), minlength=self.ep)
        send_counts = torch.stack([in_rank.sum(0), pairs_per_rank], 1)  # [ep, 2]: rows, pairs
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        sizes = torch.cat([send_counts[:, 0], recv_counts.reshape(-1)]).tolist()  # the one host sync
        send, recv, num_pairs = sizes[: self.ep], sizes[self.ep :: 2], sum(sizes[self.ep + 1 :: 2])
        # rows in (destination rank, token) order: a stable sort puts the chosen (rank, token) cells first
        cells = torch.argsort((~in_rank.t()).reshape(-1).to(torch.int8), stable=True)[: sum(send)]
        dest, token = cells // T, cells % T
        sent = SlotRows.build(token, dest, T, self.ep, triton_ok(x, "auto"))
        local = indices.index_select(0, token) - self._bounds_t.index_select(0, dest)[:, None]
        local = torch.where(owner.index_select(0, token) == dest[:, None], local, -1)
        meta = torch.cat([local.to(torch.float32), weights.index_select(0, token).float()], 1)  # ids exact in fp32
        recv_x, recv_meta = _AllToAllRowsAndMeta.apply(gather_slots(x, sent), meta, recv, send, self.group)
        routed = expand_received(recv_x, recv_meta[:, :k].detach().long(), recv_meta[:, k:], self.num_local, num_pairs)
        routed.state = _SentRows(sent, send, recv, routed.state)
        return routed

    def combine(self, y: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
        st: _SentRows = routed.state
        back = all_to_all(sum_slots(y, st.pairs), st.send, st.recv, self.group)
        return sum_slots(back, st.sent)


# ---------------------------------------------------------------- DeepEP


def deepep_available() -> bool:
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return False
    return True


_BUFFERS: dict[tuple[int, int], object] = {}


def deepep_buffer(group, hidden_bytes: int):  # noqa: ANN001, ANN201
    """One DeepEP NVLink buffer per (group, row size), sized by DeepEP's own hints for its default configs."""
    import deep_ep

    key = (id(group), hidden_bytes)
    if key not in _BUFFERS:
        n = dist.get_world_size(group)
        cfgs = (deep_ep.Buffer.get_dispatch_config(n), deep_ep.Buffer.get_combine_config(n))
        nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, n) for c in cfgs)
        _BUFFERS[key] = deep_ep.Buffer(group, nvl_bytes, 0)
    return _BUFFERS[key]


class _DeepEPDispatch(torch.autograd.Function):
    """DeepEP dispatch; backward is DeepEP combine (gradients of rows and of the routing weights go home summed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, buffer, num_experts: int, box: list, worst: int):  # noqa: ANN001
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(indices, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, topk_idx=indices, topk_weights=weights, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, num_worst_tokens=worst,
        )
        ctx.buffer, ctx.handle = buffer, handle
        box.extend([recv_idx, sum(counts) if not worst else None, handle])
        return recv_x, recv_w

    @staticmethod
    def backward(ctx, g_x: torch.Tensor | None, g_w: torch.Tensor | None):  # noqa: ANN001, ANN205
        if g_x is None:
            return None, None, None, None, None, None, None
        gw_in = None if g_w is None else g_w.float().contiguous()
        gx, gw, _ = ctx.buffer.combine(g_x.contiguous(), ctx.handle, topk_weights=gw_in)
        return gx, gw, None, None, None, None, None


class _DeepEPCombine(torch.autograd.Function):
    """DeepEP combine (sum over ranks); backward is DeepEP dispatch of the gradient with the cached layout."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, buffer, handle) -> torch.Tensor:  # noqa: ANN001
        ctx.buffer, ctx.handle = buffer, handle
        out, _, _ = buffer.combine(y.contiguous(), handle)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205
        gy, _, _, _, _, _ = ctx.buffer.dispatch(g.contiguous(), handle=ctx.handle)
        return gy, None, None


class DeepEPDispatcher(TokenDispatcher):
    """Expert parallelism through DeepEP's intranode (NVLink) kernels; bf16 rows, E divisible by ep.

    `max_tokens=None` ("deepep"): DeepEP's host waits once per layer for the received-token count, and the rows are
    sized exactly. `max_tokens=N` ("deepep_static", every rank passes at most N tokens per layer): no host sync
    anywhere (DeepEP's `num_worst_tokens = ep * N`); the received tokens and their (token, expert) rows are sized for
    the worst case and padded (`expand_received(num_pairs=None)`): more memory for the padding, the same values.
    """

    def __init__(self, num_experts: int, group, max_tokens: int | None = None) -> None:  # noqa: ANN001
        if not deepep_available():
            raise DispatcherError("dispatcher 'deepep' needs the deep_ep package (build it: docs/DEEPEP.md); or use --dispatcher alltoall")
        self.num_experts, self.group, self.max_tokens = num_experts, group, max_tokens
        self.name = "deepep" if max_tokens is None else "deepep_static"
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.ep:
            raise DispatcherError(f"dispatcher 'deepep' needs the {num_experts} experts to divide evenly over ep={self.ep}; use --dispatcher alltoall")
        self.num_local = num_experts // self.ep

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> RoutedRows:
        if x.dtype != torch.bfloat16 or not x.is_cuda:
            raise DispatcherError(f"dispatcher 'deepep' moves bf16 CUDA rows, got {x.dtype} on {x.device}; use --dispatcher alltoall")
        if self.max_tokens is not None and x.shape[0] > self.max_tokens:
            raise DispatcherError(f"dispatcher 'deepep_static' was sized for {self.max_tokens} tokens per rank and got {x.shape[0]}; use --dispatcher deepep")
        buffer = deepep_buffer(self.group, x.shape[1] * x.element_size())
        box: list = []
        worst = 0 if self.max_tokens is None else self.ep * self.max_tokens
        recv_x, recv_w = _DeepEPDispatch.apply(x, weights.float(), indices.long(), buffer, self.num_experts, box, worst)
        recv_idx, num_pairs, handle = box
        routed = expand_received(recv_x, recv_idx, recv_w, self.num_local, num_pairs)
        routed.state = (routed.state, buffer, handle)
        return routed

    def combine(self, y: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
        pairs, buffer, handle = routed.state
        return _DeepEPCombine.apply(sum_slots(y, pairs), buffer, handle)


DISPATCHERS = ("auto", "alltoall", "deepep", "deepep_static")


def choose_dispatcher(name: str, ep: int, device_type: str) -> str:
    """`auto` -> deepep where deep_ep imports, the device is CUDA and ep > 1, else alltoall; others are checked."""
    if name not in DISPATCHERS:
        raise DispatcherError(f"dispatcher {name!r} is unknown; use one of {', '.join(DISPATCHERS)}")
    if name == "auto":
        return "deepep" if ep > 1 and device_type == "cuda" and deepep_available() else "alltoall"
    if name.startswith("deepep") and not deepep_available():
        raise DispatcherError(f"dispatcher {name!r} needs the deep_ep package (build it: docs/DEEPEP.md); or use --dispatcher alltoall")
    if name.startswith("deepep") and device_type != "cuda":
        raise DispatcherError(f"dispatcher {name!r} runs on CUDA GPUs only; use --dispatcher alltoall")
    return name


def check_token_bound(name: str, max_tokens: int | None) -> None:
    """`deepep_static` needs `max_tokens`, the most tokens any rank passes to one experts module in one call (batch x
    seq), to size its buffers; one line otherwise."""
    if name == "deepep_static" and not max_tokens:
        raise DispatcherError("dispatcher 'deepep_static' needs the tokens per rank (batch x seq) to size its buffers; use --dispatcher deepep")


def make_dispatcher(name: str, num_experts: int, group, max_tokens: int | None = None) -> TokenDispatcher:  # noqa: ANN001
    """A resolved dispatcher name (see `choose_dispatcher`) -> the dispatcher for one experts module (`check_token_bound`)."""
    check_token_bound(name, max_tokens)
    if name == "deepep_static":
        return DeepEPDispatcher(num_experts, group, max_tokens)
    return DeepEPDispatcher(num_experts, group) if name == "deepep" else AllToAllDispatcher(num_experts, group)
