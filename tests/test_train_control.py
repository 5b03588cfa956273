"""Training controls (`train/control.py`, `train/trainer.py`): LR schedules, gradient clipping on the true global norm,
gradient accumulation, the router's auxiliary loss and bias update, evaluation.

References: torch's own LR schedulers; transformers' model (float32) computing the loss and `clip_grad_norm_` in one
process for the gradient norm of a 2-rank gloo run (ep=2 and ep=1, so experts are sharded over ep, and FSDP-sharded
over the ranks holding the same experts); one batch of 2 for two accumulated micro-batches of 1; transformers'
forward for the evaluation loss.
"""

from __future__ import annotations

import pytest
import torch

from automodel_convert.train import TrainConfig, Trainer
from automodel_convert.train.control import lr_at

from conftest import FIXTURES, fixture_path
from spawn_ranks import run_ranks

CHAT = FIXTURES / "chat"
COMMON = dict(model=str(fixture_path("qwen3_moe")), tokenizer=str(CHAT), data=str(CHAT / "chat.jsonl"), seq=32, dtype="float32",
              device="cpu", quiet=True, lr=3e-3)


@pytest.fixture(autouse=True)
def _destroy_group():
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def test_lr_schedules_match_torch_schedulers():
    p = torch.nn.Parameter(torch.zeros(1))
    for kind, make in (("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=1e-4)),
                       ("linear", lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=8)),
                       ("constant", lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0, total_iters=1))):
        cfg = TrainConfig(model="m", lr=1e-3, min_lr=1e-4, warmup=3, steps=11, lr_schedule=kind)
        warm = torch.optim.SGD([p], lr=1e-3)
        wsched = torch.optim.lr_scheduler.LinearLR(warm, start_factor=1 / 3, end_factor=1.0, total_iters=2)
        for step in range(3):
            assert lr_at(cfg, step) == pytest.approx(warm.param_groups[0]["lr"], rel=1e-9), (kind, step)
            warm.step()
            wsched.step()
        opt = torch.optim.SGD([p], lr=1e-3)
        sched = make(opt)
        for step in range(3, 12):
            assert lr_at(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), (kind, step)
            opt.step()
            sched.step()
    assert lr_at(TrainConfig(model="m", lr=1e-3, steps=10), 10) == pytest.approx(1e-4)  # default floor: lr / 10


def test_grad_accum_equals_one_bigger_batch():
    runs = {}
    for batch, accum in ((2, 1), (1, 2)):
        t = Trainer(TrainConfig(**COMMON, batch=batch, grad_accum=accum, steps=3))
        hist = t.run()
        runs[accum] = ([m["loss"] for m in hist], {n: p.detach().clone() for n, p in t.model.named_parameters()}, [m["grad_norm"] for m in hist])
        import torch.distributed as dist

        dist.destroy_process_group()
    assert runs[1][0] == pytest.approx(runs[2][0], rel=1e-5) and runs[1][0][2] < runs[1][0][0]
    assert runs[1][2] == pytest.approx(runs[2][2], rel=1e-5)  # the gradient's scale (AdamW's update hides it)
    for n, p in runs[1][1].items():  # AdamW amplifies float noise of near-zero gradients: far below one lr step
        torch.testing.assert_close(runs[2][1][n], p, rtol=1e-4, atol=1e-4)


def _clip_worker(rank: int, world: int, ep: int) -> dict:
    from automodel_convert.train.control import global_grad_norm

    t = Trainer(TrainConfig(**COMMON, ep=ep, steps=1, grad_clip=1e-2, packing_mask="causal"))
    batch = {k: v.clone() for k, v in t.data.window(rank).items()}  # what this rank trains on at step 1 (batch 1)
    after = []
    step = t.optimizer.step
    t.optimizer.step = lambda: (after.append(global_grad_norm(t.model.parameters()).item()), step())[1]
    m = t.step()
    return {"norm": m["grad_norm"], "after": after[0], "batch": batch}


@pytest.mark.parametrize("ep", [2, 1])
def test_grad_clip_uses_the_global_norm_of_a_single_process(ep):
    import transformers

    res = run_ranks(_clip_worker, 2, ep)
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture_path("qwen3_moe"), dtype=torch.float32)
    losses = []
    for r in res:  # the mean of the ranks' mean losses: what FSDP's averaged gradients are the gradient of
        b = r["batch"]
        logits = model(input_ids=b["input_ids"][None], position_ids=b["position_ids"][None]).logits[0]
        losses.append(torch.nn.functional.cross_entropy(logits, b["shift_labels"], ignore_index=-100))
    (sum(losses) / 2).backward()
    ref = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    assert ref > 0.05  # so clipping to 1e-2 acts
    for r in res:
        assert r["norm"] == pytest.approx(ref, rel=1e-4), (r["norm"], ref)
        assert r["after"] == pytest.approx(1e-2, rel=1e-3)


def test_aux_loss_coef_adds_the_load_balancing_loss():
    got = {}
    for coef in (0.0, 0.5):
        t = Trainer(TrainConfig(**COMMON, steps=1, aux_loss_coef=coef))
        got[coef] = t.step()
        import torch.distributed as dist

        dist.destroy_process_group()
    assert "aux_loss" not in got[0.0] and got[0.5]["aux_loss"] > 0
    assert got[0.5]["loss"] - got[0.0]["loss"] == pytest.approx(0.5 * got[0.5]["aux_loss"], rel=1e-4)


def test_router_bias_update_moves_deepseek_biases():
    t = Trainer(TrainConfig(model=str(fixture_path("deepseek_v3")), seq=16, dtype="float32", device="cpu", quiet=True, steps=1, router_bias_rate=1e-2))
    before = {n: b.clone() for n, b in t.model.named_buffers() if n.endswith("e_score_correction_bias")}
    t.step()
    after = dict(t.model.named_buffers())
    assert before
    for n, b in before.items():
        delta = (after[n].float() - b.float()).abs()  # the fixture keeps this buffer in bf16 (spacing ~1e-3 here)
        assert torch.all((delta < 1e-6) | ((delta - 1e-2).abs() < 2e-3)) and delta.max() > 0, (n, delta)


def test_eval_loss_equals_transformers_on_the_eval_windows():
    import transformers

    t = Trainer(TrainConfig(**COMMON, eval_data=str(CHAT / "eval.jsonl"), packing_mask="causal", steps=1))
    got = t.evaluate()
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture_path("qwen3_moe"), dtype=torch.float32)
    total = count = 0.0
    with torch.no_grad():
        for b in t.eval_data.eval_batches():
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["shift_labels"].flatten(), ignore_index=-100, reduction="sum").item()
            count += (b["shift_labels"] != -100).sum().item()
    assert got == pytest.approx(total / count, rel=1e-5)
