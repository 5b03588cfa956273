"""Grouped experts on CPU: dispatch plan, the three grouped-GEMM back-ends, the EP entry point, gradients."""

from __future__ import annotations

import pytest
import torch

from automodel_convert.models.common.experts import GroupedExperts, dispatch_plan, grouped_linear


def reference(experts: GroupedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert."""
    out = torch.zeros_like(x)
    i = experts.intermediate_size
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if experts.layout == "concat":
                h = experts.gate_up_proj[e] @ x[t]
                a = torch.nn.functional.silu(h[:i]) * h[i:]
                y = experts.down_proj[e] @ a
            else:
                h = x[t] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
                g, u = h[::2].clamp(max=experts.limit), h[1::2].clamp(-experts.limit, experts.limit)
                y = ((u + 1) * g * torch.sigmoid(g * experts.alpha)) @ experts.down_proj[e] + experts.down_proj_bias[e]
            out[t] += w[t, j] * y
    return out


def make(layout: str, impl: str, e: int = 6, h: int = 32, i: int = 24) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(e, h, i, layout=layout, impl=impl, swiglu_alpha=1.702, swiglu_limit=1.5)
    for p in experts.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return experts


def test_dispatch_plan() -> None:
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])
    plan = dispatch_plan(idx, 4)
    assert plan.offsets.tolist() == [2, 3, 6, 6]
    assert plan.sorted_ids.tolist() == [0, 0, 1, 2, 2, 2]
    assert torch.equal(idx.reshape(-1)[plan.perm], plan.sorted_ids)
    assert torch.equal(plan.perm[plan.inv_perm], torch.arange(6))
    assert torch.equal(plan.token_idx, plan.perm // 2)


@pytest.mark.parametrize("layout", ["concat", "gpt_oss"])
@pytest.mark.parametrize("impl", ["grouped_mm", "padded", "loop", "auto"])
def test_forward_and_grads_match_reference(layout: str, impl: str) -> None:
    experts = make(layout, impl)
    x = torch.randn(9, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(9)])
    idx[:, 0] = 5  # one busy expert, and some idle ones
    w = torch.rand(9, 3, requires_grad=True)
    out = experts(x, idx, w)
    want = reference(experts, x, idx, w)
    assert (out - want).abs().max() < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, *experts.parameters()), g)
    ref = torch.autograd.grad(want, (x, w, *experts.parameters()), g)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < 1e-4


def test_run_grouped_is_the_one_compute_path() -> None:
    """What every dispatcher feeds: rows already sorted by expert, int32 cumulative offsets, no routing weight."""
    experts = make("concat", "auto")
    counts = torch.tensor([3, 0, 2, 4, 0, 1])
    x = torch.randn(int(counts.sum()), 32)
    ids = torch.repeat_interleave(torch.arange(6), counts)
    out = experts.run_grouped(x, torch.cumsum(counts, 0).to(torch.int32), ids)
    want = reference(experts, x, ids[:, None], torch.ones(x.shape[0], 1))
    assert (out - want).abs().max() < 1e-5


def test_explicit_grouped_mm_refuses_unaligned_rows() -> None:
    x, w = torch.randn(4, 5), torch.randn(2, 5, 7)
    offsets = torch.tensor([2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="16-byte"):
        grouped_linear(x, w, offsets, torch.tensor([0, 0, 1, 1]), "grouped_mm")
    assert grouped_linear(x, w, offsets, torch.tensor([0, 0, 1, 1]), "auto").shape == (4, 7)
