"""Routers: group-limited top-k against brute force, aux loss against transformers, balanced gate, bias update."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from automodel_convert.models.common.router import (
    SigmoidGroupRouter,
    SoftmaxTopKRouter,
    balanced_indices,
    load_balancing_loss,
)
from automodel_convert.models.testing import tiny_config


def brute_force_group_topk(choice: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> list[set[int]]:
    """For each row: the best `topk_group` groups by (sum of each group's two best scores), then the best `top_k`
    experts inside them, by enumerating every set of groups."""
    e = choice.shape[1]
    per = e // n_group
    out = []
    for row in choice.tolist():
        groups = [row[g * per : (g + 1) * per] for g in range(n_group)]
        gscore = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        best = max(itertools.combinations(range(n_group), topk_group), key=lambda gs: sum(gscore[g] for g in gs))
        allowed = [g * per + j for g in best for j in range(per)]
        out.append(set(sorted(allowed, key=lambda i: row[i], reverse=True)[:top_k]))
    return out


@pytest.mark.parametrize(("n_group", "topk_group", "top_k"), [(4, 2, 3), (8, 3, 4), (2, 1, 2), (1, 1, 5)])
def test_group_limited_topk_matches_brute_force(n_group: int, topk_group: int, top_k: int) -> None:
    torch.manual_seed(n_group * 10 + top_k)
    router = SigmoidGroupRouter(16, 8, top_k, n_group=n_group, topk_group=topk_group)
    router.e_score_correction_bias.normal_(0, 0.1)
    scores = torch.rand(64, 16)
    got = [set(r) for r in router.select(scores).tolist()]
    want = brute_force_group_topk(scores + router.e_score_correction_bias, n_group, topk_group, top_k)
    assert got == want


def test_sigmoid_router_matches_transformers() -> None:
    cfg = tiny_config("deepseek_v3")
    ref = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(0)
    ref.weight.data.normal_(0, 0.2)
    ref.e_score_correction_bias.normal_(0, 0.05)
    ours = SigmoidGroupRouter(
        cfg.n_routed_experts, cfg.hidden_size, cfg.num_experts_per_tok, n_group=cfg.n_group,
        topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
    )
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(40, cfg.hidden_size)
    logits_r, w_r, i_r = ref(x)
    r = ours(x)
    assert torch.equal(r.logits, logits_r)
    order_r, order_o = i_r.sort(dim=1), r.indices.sort(dim=1)
    assert torch.equal(order_r.values, order_o.values)
    assert torch.allclose(w_r.gather(1, order_r.indices), r.weights.gather(1, order_o.indices), atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_matches_transformers(masked: bool) -> None:
    torch.manual_seed(1)
    batch, seq, e, k = 3, 7, 10, 3
    logits = tuple(torch.randn(batch * seq, e) for _ in range(4))
    mask = None
    if masked:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :2] = 0
        mask[2, -3:] = 0
    want = load_balancing_loss_func(logits, e, k, mask)
    got = load_balancing_loss(logits, e, k, mask)
    assert torch.allclose(got, want, atol=1e-6), (got, want)


def test_balanced_gate_spreads_tokens_evenly() -> None:
    t, k, e = 48, 4, 12
    idx = balanced_indices(t, k, e, torch.device("cpu"))
    assert torch.equal(torch.bincount(idx.flatten(), minlength=e), torch.full((e,), t * k // e))
    assert all(len(set(row)) == k for row in idx.tolist())
    for router in (
        SoftmaxTopKRouter(e, 16, k, norm_topk_prob=True),
        SigmoidGroupRouter(e, 16, k, n_group=4, topk_group=2),
    ):
        torch.nn.init.normal_(router.weight, 0, 1.0)
        router.balanced = True
        r = router(torch.randn(t, 16))
        assert torch.equal(r.indices, idx)
        assert torch.allclose(r.weights.sum(-1), torch.ones(t), atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        balanced_indices(4, 5, 4, torch.device("cpu"))


def test_aux_free_bias_update_moves_towards_balance() -> None:
    router = SigmoidGroupRouter(4, 8, 1).train()
    router.weight.data.zero_()
    router.weight.data[0] = 1.0  # expert 0 wins every token with positive features
    router(torch.rand(32, 8) + 0.1)
    load = router.update_bias(rate=0.01)
    assert load.tolist() == [32.0, 0.0, 0.0, 0.0]
    assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert router.expert_load.sum() == 0  # reset after the update
    before = router.e_score_correction_bias.clone()
    router.update_bias(rate=0.5, expert_load=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(router.e_score_correction_bias, before)  # balanced load: no change
