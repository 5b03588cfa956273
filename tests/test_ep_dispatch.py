"""Expert-parallel dispatch equals single-process MoE, forward and backward (gloo, ranks started by `spawn_ranks`).

The experts are the zoo's `GroupedExperts` holding one rank's `Shard(0)` slice with the all-to-all dispatcher swapped
in; the reference is a float32 dense loop over every (token, expert) pair on one process. Checked: the
output, the gradients of the tokens, of the routing weights and of this rank's expert weights, for 7 experts over 2
and 4 ranks (uneven: the last of 4 ranks holds one expert), and that each token crosses to a rank at most once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automodel_convert.models.common.dispatch import LocalDispatcher
from automodel_convert.models.common.experts import GroupedExperts
from automodel_convert.parallel.ep_dispatch import AllToAllDispatcher, expert_bounds

from spawn_ranks import init_gloo, run_ranks

T, H, I, E, K = 13, 16, 12, 7, 3  # 7 experts: uneven over 2 and 4 ranks


def _problem(rank: int):
    g = torch.Generator().manual_seed(1234)
    w_gu = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w_down = torch.randn(E, H, I, generator=g) / I**0.5
    gx = torch.Generator().manual_seed(100 + rank)  # every rank has its own tokens
    x = torch.randn(T, H, generator=gx)
    logits = torch.randn(T, E, generator=gx)
    w, idx = torch.softmax(logits, -1).topk(K, dim=-1)
    return w_gu, w_down, x, idx, w


def _experts(w_gu: torch.Tensor, w_down: torch.Tensor, num_experts: int = E) -> GroupedExperts:
    mod = GroupedExperts(num_experts, H, I, impl="loop")
    mod.gate_up_proj = torch.nn.Parameter(w_gu.clone())
    mod.down_proj = torch.nn.Parameter(w_down.clone())
    return mod


def _dense_loop(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w_gu: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(H)
        for j in range(idx.shape[1]):
            e = idx[t, j]
            gate, up = (x[t] @ w_gu[e].t()).chunk(2)
            acc = acc + w[t, j] * ((F.silu(gate) * up) @ w_down[e].t())
        rows.append(acc)
    return torch.stack(rows)


def _reference(world: int):
    """One process, all experts, every rank's tokens: outputs and gradients (a full-tensor dense loop)."""
    w_gu, w_down, *_ = _problem(0)
    w_gu.requires_grad_(True)
    w_down.requires_grad_(True)
    outs, grads = [], []
    for r in range(world):
        _, _, x, idx, w = _problem(r)
        x.requires_grad_(True)
        w.requires_grad_(True)
        out = _dense_loop(x, idx, w, w_gu, w_down)
        (out * (r + 1)).sum().backward()
        outs.append(out.detach())
        grads.append((x.grad, w.grad))
    return outs, grads, w_gu.grad, w_down.grad


def _worker(rank: int, world: int) -> tuple:
    init_gloo()
    w_gu, w_down, x, idx, w = _problem(rank)
    b = expert_bounds(E, world)
    mod = _experts(w_gu[b[rank] : b[rank + 1]], w_down[b[rank] : b[rank + 1]])
    mod.dispatcher = AllToAllDispatcher(E)
    x.requires_grad_(True)
    w.requires_grad_(True)
    routed = mod.dispatcher.dispatch(x, idx, w)
    sent = routed.state.sent.token.numel()  # rows this rank sent (each a (token, rank) pair)
    out = mod.dispatcher.combine(mod.run_grouped(routed.x, routed.offsets, routed.expert_ids, routed.weights), routed)
    (out * (rank + 1)).sum().backward()
    owners = torch.bucketize(idx, torch.tensor(b[1:-1]), right=True)
    distinct = sum(len(set(row.tolist())) for row in owners)
    return rank, out.detach(), x.grad, w.grad, mod.gate_up_proj.grad, mod.down_proj.grad, sent, distinct


@pytest.mark.parametrize("world", [2, 4])
def test_alltoall_matches_single_process(world):
    ref_out, ref_grads, ref_gu, ref_down = _reference(world)
    results = run_ranks(_worker, world)
    b = expert_bounds(E, world)
    for rank, out, xg, wg, gu, down, sent, distinct in results:
        torch.testing.assert_close(out, ref_out[rank], atol=1e-5, rtol=0)
        torch.testing.assert_close(xg, ref_grads[rank][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(wg, ref_grads[rank][1], atol=1e-5, rtol=0)
        torch.testing.assert_close(gu, ref_gu[b[rank] : b[rank + 1]], atol=1e-5, rtol=0)
        torch.testing.assert_close(down, ref_down[b[rank] : b[rank + 1]], atol=1e-5, rtol=0)
        assert sent == distinct < T * K, (sent, distinct)  # once per (token, destination rank), not per pair


def test_local_dispatch_matches_dense_loop():
    w_gu, w_down, x, idx, w = _problem(0)
    mod = _experts(w_gu, w_down)
    assert isinstance(mod.dispatcher, LocalDispatcher)
    torch.testing.assert_close(mod(x, idx, w), _dense_loop(x, idx, w, w_gu, w_down), atol=1e-5, rtol=0)


def test_expert_bounds_follow_torch_chunk():
    for n, ep in [(7, 2), (7, 4), (8, 3), (128, 8), (3, 4)]:
        b = expert_bounds(n, ep)
        sizes = [b[r + 1] - b[r] for r in range(ep)]
        chunks = [c.numel() for c in torch.arange(n).chunk(ep)]
        assert sizes[: len(chunks)] == chunks and sum(sizes) == n
