"""All-to-all expert-parallel dispatch equals single-process MoE, forward and backward (gloo, ranks spawned by `spawn_ranks`)."""

from __future__ import annotations

import pytest
import torch

from automodel_convert.parallel.ep_dispatch import AllToAllDispatcher, LocalDispatcher, expert_bounds

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


def _experts(w_gu: torch.Tensor, w_down: torch.Tensor):
    def run(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs = []
        for j, chunk in enumerate(xs.split(counts.tolist())):
            gate, up = (chunk @ w_gu[j].t()).chunk(2, dim=-1)
            outs.append((torch.nn.functional.silu(gate) * up) @ w_down[j].t())
        return torch.cat(outs) if outs else xs.new_zeros((0, w_down.shape[1]))

    return run


def _reference(world: int):
    """One process, all experts, every rank's tokens: outputs and gradients."""
    w_gu, w_down, *_ = _problem(0)
    w_gu.requires_grad_(True)
    w_down.requires_grad_(True)
    outs, xgrads = [], []
    for r in range(world):
        _, _, x, idx, w = _problem(r)
        x.requires_grad_(True)
        w.requires_grad_(True)
        out = LocalDispatcher(E)(x, idx, w, _experts(w_gu, w_down))
        (out * (r + 1)).sum().backward()
        outs.append(out.detach())
        xgrads.append((x.grad, w.grad))
    return outs, xgrads, w_gu.grad, w_down.grad


def _worker(rank: int, world: int) -> tuple:
    init_gloo()
    w_gu, w_down, x, idx, w = _problem(rank)
    b = expert_bounds(E, world)
    local_gu = w_gu[b[rank] : b[rank + 1]].clone().requires_grad_(True)
    local_down = w_down[b[rank] : b[rank + 1]].clone().requires_grad_(True)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = AllToAllDispatcher(E)(x, idx, w, _experts(local_gu, local_down))
    (out * (rank + 1)).sum().backward()
    return rank, out.detach(), x.grad, w.grad, local_gu.grad, local_down.grad


@pytest.mark.parametrize("world", [2, 4])
def test_alltoall_matches_single_process(world):
    ref_out, ref_grads, ref_gu, ref_down = _reference(world)
    results = run_ranks(_worker, world)
    b = expert_bounds(E, world)
    for rank, out, xg, wg, gu, down in results:
        torch.testing.assert_close(out, ref_out[rank], atol=1e-5, rtol=0)
        torch.testing.assert_close(xg, ref_grads[rank][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(wg, ref_grads[rank][1], atol=1e-5, rtol=0)
        torch.testing.assert_close(gu, ref_gu[b[rank] : b[rank + 1]], atol=1e-5, rtol=0)
        torch.testing.assert_close(down, ref_down[b[rank] : b[rank + 1]], atol=1e-5, rtol=0)


def test_local_dispatch_matches_dense_loop():
    w_gu, w_down, x, idx, w = _problem(0)
    out = LocalDispatcher(E)(x, idx, w, _experts(w_gu, w_down))
    ref = torch.zeros_like(out)
    for t in range(T):
        for j in range(K):
            e = idx[t, j]
            gate, up = (x[t] @ w_gu[e].t()).chunk(2)
            ref[t] += w[t, j] * ((torch.nn.functional.silu(gate) * up) @ w_down[e].t())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_expert_bounds_follow_torch_chunk():
    for n, ep in [(7, 2), (7, 4), (8, 3), (128, 8), (3, 4)]:
        b = expert_bounds(n, ep)
        sizes = [b[r + 1] - b[r] for r in range(ep)]
        chunks = [c.numel() for c in torch.arange(n).chunk(ep)]
        assert sizes[: len(chunks)] == chunks and sum(sizes) == n
