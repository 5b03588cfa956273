"""Expert parallelism on 2 GPUs (marked `gpu`; run on the device, skipped in CI and on machines with fewer GPUs).

- The DeepEP dispatcher against the all-to-all dispatcher over NCCL: the same experts (the zoo's grouped GEMM on this
  rank's `Shard(0)` slice, bf16), the same tokens: outputs and the gradients of tokens, routing weights and expert
  weights agree within bf16 tolerance; and both agree with a float32 one-process reference. `deepep_static` (no host
  sync, rows padded to the worst case) equals `deepep` bit for bit.
- A 20-step EP=2 training run (trainer, random init, synthetic random tokens, so the loss moves around ln(vocab) rather
  than falling) gives the same loss curve, step for step, with every dispatcher.
- Save and resume with each dispatcher: a run saved at step 2 and resumed continues with the losses and ends with the
  parameters of the uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch

from spawn_ranks import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

T, H, I, E, K = 1024, 512, 256, 32, 8


def _problem(rank: int):
    g = torch.Generator().manual_seed(7)
    w_gu = torch.randn(E, 2 * I, H, generator=g) * 0.05
    w_down = torch.randn(E, H, I, generator=g) * 0.05
    gx = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, H, generator=gx)
    w, idx = torch.softmax(torch.randn(T, E, generator=gx), -1).topk(K, dim=-1)
    return w_gu, w_down, x, idx, w / w.sum(-1, keepdim=True)


def _run(rank: int, world: int, dispatcher: str, dtype: torch.dtype, full: bool, recompute: bool = False) -> dict:
    """One rank's experts (or all of them, `full`) through `dispatcher`; outputs and gradients as float32 on CPU."""
    import torch.distributed as dist

    from automodel_convert.models.common.experts import GroupedExperts
    from automodel_convert.parallel.ep_dispatch import expert_bounds, make_dispatcher

    w_gu, w_down, x, idx, w = _problem(rank)
    dev = torch.device("cuda", rank)
    lo, hi = (0, E) if full else expert_bounds(E, world)[rank : rank + 2]
    mod = GroupedExperts(E, H, I, impl="grouped_mm" if dtype == torch.bfloat16 else "loop", recompute=recompute).to(dev)
    mod.gate_up_proj = torch.nn.Parameter(w_gu[lo:hi].to(dev, dtype))
    mod.down_proj = torch.nn.Parameter(w_down[lo:hi].to(dev, dtype))
    if not full:
        mod.dispatcher = make_dispatcher(dispatcher, E, dist.group.WORLD, T)
        mod.grad_scale = 1.0
    x = x.to(dev, dtype).requires_grad_(True)
    w = w.to(dev).requires_grad_(True)
    out = mod(x, idx.to(dev), w)
    out.float().square().sum().backward()
    return {k: v.detach().float().cpu() for k, v in dict(out=out, dx=x.grad, dw=w.grad, d_gate_up=mod.gate_up_proj.grad, d_down=mod.down_proj.grad).items()}


def _dispatch_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    return {name: _run(rank, world, name, torch.bfloat16, False) for name in ("alltoall", "deepep", "deepep_static")}


def _recompute_worker(rank: int, world: int, dispatchers: tuple[str, ...]) -> dict:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    return {(name, r): _run(rank, world, name, torch.bfloat16, False, r) for name in dispatchers for r in (False, True)}


def test_expert_recompute_is_bit_identical_with_each_dispatcher():
    """The gathered rows are rebuilt from the rows each dispatcher received (all-to-all: a fresh buffer; DeepEP: its
    returned tensor): outputs and gradients equal keeping them, bit for bit."""
    has_deepep = __import__("importlib").util.find_spec("deep_ep") is not None
    dispatchers = ("alltoall", "deepep", "deepep_static") if has_deepep else ("alltoall",)
    for rank, res in enumerate(run_ranks(_recompute_worker, 2, dispatchers, timeout_s=300)):
        for name in dispatchers:
            for key, v in res[(name, False)].items():
                assert torch.equal(res[(name, True)][key], v), (rank, name, key)


def _close(a: torch.Tensor, b: torch.Tensor, name: str, rel: float = 2e-2) -> None:
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rel * scale + 1e-3, f"{name}: max error {err:.3g} against max {scale:.3g}"


@pytest.mark.skipif(not __import__("importlib").util.find_spec("deep_ep"), reason="needs deep_ep (docs/DEEPEP.md)")
def test_deepep_equals_alltoall_and_fp32_reference():
    results = run_ranks(_dispatch_worker, 2, timeout_s=300)
    refs = [_run(rank, 2, "", torch.float32, True) for rank in range(2)]  # one process, every expert, float32
    for rank, res in enumerate(results):
        b = (0, E // 2) if rank == 0 else (E // 2, E)
        for key in ("out", "dx", "dw", "d_gate_up", "d_down"):
            # tokens and routing weights are per rank; an expert's gradient sums every rank's tokens routed to it
            r = (refs[0][key] + refs[1][key])[b[0] : b[1]] if key in ("d_gate_up", "d_down") else refs[rank][key]
            _close(res["deepep"][key], res["alltoall"][key], f"rank {rank} {key} deepep vs alltoall")
            _close(res["deepep"][key], r, f"rank {rank} {key} deepep vs fp32")
            # no host sync, rows padded to the worst case: the same rows in the same order, so the same bits
            assert torch.equal(res["deepep_static"][key], res["deepep"][key]), (rank, key)


def _train_worker(rank: int, world: int, folder: str, dispatcher: str) -> list[float]:
    from automodel_convert.train import TrainArgs, Trainer

    t = Trainer(TrainArgs(model=folder, init="random", ep=2, seq=512, steps=20, lr=3e-4, warmup=2, dispatcher=dispatcher, quiet=True, device="cuda"))
    return [m["loss"] for m in t.run()]


@pytest.mark.skipif(not __import__("importlib").util.find_spec("deep_ep"), reason="needs deep_ep (docs/DEEPEP.md)")
def test_twenty_step_loss_curve_matches_between_dispatchers(tmp_path):
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                                      norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=1024)
    cfg.save_pretrained(tmp_path)
    curves = {d: run_ranks(_train_worker, 2, str(tmp_path), d, timeout_s=400)[0] for d in ("alltoall", "deepep", "deepep_static")}
    a, b = curves["alltoall"], curves["deepep"]
    assert len(a) == len(b) == 20 and len({round(x, 4) for x in a}) > 10, curves  # the updates change the loss
    for i, (x, y, z) in enumerate(zip(a, b, curves["deepep_static"])):
        assert abs(x - y) <= 2e-2 * abs(x) and abs(z - y) <= 2e-2 * abs(x), (i, curves)


def _reduce_worker(rank: int, world: int, folder: str, reduce_dtype: str, overlap: bool = False, grad_clip: float = 1.0) -> dict:
    import hashlib

    from automodel_convert.train import TrainArgs, Trainer

    t = Trainer(TrainArgs(model=folder, init="random", ep=2, seq=512, steps=6, lr=3e-4, warmup=1, dispatcher="alltoall", quiet=True,
                          device="cuda", reduce_dtype=reduce_dtype, overlap_optimizer=overlap, grad_clip=grad_clip))
    losses = [m["loss"] for m in t.run()]
    if hasattr(t.optimizer, "finish"):
        t.optimizer.finish()
    digests = {}
    for n, p in t.model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        digests[n] = hashlib.sha256(local.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
    return {"losses": losses, "params": digests, "reduce": {k: str(v) for k, v in t.model.grad_reduce_dtypes.items()}}


def test_bf16_reduce_trains_bit_identically_to_fp32_on_two_gpus(tmp_path):
    """NCCL: six EP=2 steps (bf16 parameters, the head its own FSDP unit) with the gradients reduced in bf16 ("auto"
    at 2 ranks) and in fp32 give the same losses and the same parameters, bit for bit, on every rank."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                                      norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=1024)
    cfg.save_pretrained(tmp_path)
    runs = {r: run_ranks(_reduce_worker, 2, str(tmp_path), r, timeout_s=400) for r in ("float32", "auto")}
    assert runs["auto"][0]["reduce"]["dense"] == "torch.bfloat16" and runs["float32"][0]["reduce"]["dense"] == "torch.float32"
    for rank in range(2):
        a, b = runs["float32"][rank], runs["auto"][rank]
        assert a["losses"] == b["losses"], (rank, a["losses"], b["losses"])
        assert a["params"] == b["params"], [n for n in a["params"] if a["params"][n] != b["params"][n]]


def test_overlap_optimizer_at_ep2_trains_bit_identically_on_two_gpus(tmp_path):
    """NCCL + side stream: six EP=2 steps with the experts' AdamW inside backward (`--overlap-optimizer`) give the
    same losses and parameters, bit for bit, as the standard loop (both without clipping)."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                                      norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=1024)
    cfg.save_pretrained(tmp_path)
    std = run_ranks(_reduce_worker, 2, str(tmp_path), "auto", False, 0.0, timeout_s=400)
    ovl = run_ranks(_reduce_worker, 2, str(tmp_path), "auto", True, 0.0, timeout_s=400)
    for rank in range(2):
        assert std[rank]["losses"] == ovl[rank]["losses"], (rank, std[rank]["losses"], ovl[rank]["losses"])
        assert std[rank]["params"] == ovl[rank]["params"], [n for n in std[rank]["params"] if std[rank]["params"][n] != ovl[rank]["params"][n]]


def _resume_worker(rank: int, world: int, folder: str, out: str, dispatcher: str) -> dict:
    from automodel_convert.train import TrainArgs, Trainer

    common = dict(model=folder, seed=0, ep=2, seq=512, steps=4, lr=3e-4, warmup=1, dispatcher=dispatcher, quiet=True, device="cuda")
    a = Trainer(TrainArgs(**common, save=f"{out}/a", save_every=2))
    losses_a = [m["loss"] for m in a.run()]
    b = Trainer(TrainArgs(**common, resume=f"{out}/a/step-2"))
    losses_b = [m["loss"] for m in b.run()]
    params = {}
    for name, t in (("a", a), ("b", b)):
        params[name] = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().float().cpu() for n, p in t.model.named_parameters()}
    return {"a": losses_a, "b": losses_b, "params": params}


@pytest.mark.parametrize("dispatcher", ["alltoall"] + [pytest.param(d, marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("deep_ep"), reason="needs deep_ep (docs/DEEPEP.md)")) for d in ("deepep", "deepep_static")])
def test_save_and_resume_continue_the_run_with_each_dispatcher(tmp_path, dispatcher):
    """NCCL, bf16: 4 EP=2 steps saved at step 2; the run resumed from step-2 gives steps 3-4's losses and the final
    parameters of the uninterrupted run (within bf16 rounding: GPU kernels need not reduce in the same order)."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                                      norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "model")  # --save needs weights
    res = run_ranks(_resume_worker, 2, str(tmp_path / "model"), str(tmp_path / "runs"), dispatcher, timeout_s=400)
    for rank, r in enumerate(res):
        assert len(r["a"]) == 4 and len(r["b"]) == 2, r
        for got, want in zip(r["b"], r["a"][2:]):
            assert abs(got - want) <= 1e-3 * abs(want), (rank, r["a"], r["b"])
        for n, want in r["params"]["a"].items():
            _close(r["params"]["b"][n], want, f"rank {rank} {n} resumed vs uninterrupted", rel=1e-2)
