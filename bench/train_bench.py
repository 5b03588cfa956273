"""Training-step benchmark: the zoo's Qwen3-MoE against transformers v5, same process, same optimizer.

    python bench/train_bench.py                           # one H200: Qwen3-30B-A3B shapes, 8 layers, seq 4096
    python bench/train_bench.py --gate balanced           # plus labelled runs with the round-robin gate
    python bench/train_bench.py --profile /tmp/prof.txt   # plus a torch profiler summary per run
    python bench/train_bench.py --device cpu --layers 1 --seq 64 --tiny   # CPU smoke test
    python bench/train_bench.py --runs ours,trainer                        # the trainer (ep=1) against the zoo
    python bench/train_bench.py --runs transformers,ours_overlap,ours_graphs_overlap   # AdamW inside backward
    torchrun --nproc_per_node 2 bench/train_bench.py --runs trainer --ep 2  # EP=2 x dp=2, per-GPU figures

Shapes: vocab 151936, H 2048, I 768, 128 experts top-8 (norm_topk_prob), 32 heads, 4 KV heads, head_dim 128,
`--layers` layers, batch 1, bf16 parameters, random tokens (labels = inputs), AdamW (fused where the device has it).
Each run: build the model, warm up (`--warmup` steps, excluded), then `--steps` timed steps; the median of forward
(model call with labels, loss included), backward, optimizer (step + zero_grad) and whole step, tokens/s, TFLOP/s
with the FLOP formula of shared/bench/hf_v5_train_baseline.py, MFU against the measured 790 TFLOP/s bf16 matmul
ceiling, and peak allocated memory. Note the zoo computes the loss's gradient in the forward (chunked
cross-entropy), so compare forward+backward ("fb_ms") rather than forward and backward separately.
transformers runs `Qwen3MoeForCausalLM` with `_experts_implementation="grouped_mm"` and sdpa. The first model is
freed before the second is built. One JSON line per run, then a table with ours/transformers ratios.
Run names: `transformers`, `ours`, `trainer`; `_graphs` (ours and trainer) replays CUDA graphs per decoder layer
(models/common/graphs.py); `_overlap` steps the same fused AdamW per parameter inside backward, on a side stream, as
each gradient is complete (train/optim.py): its `bwd_ms` then includes the optimizer's work and `opt_ms` is only what
is left after backward; compare whole steps. `_defer` is `_overlap` plus the updates of the embeddings and the first
half of the layers deferred to the next forward, which waits for them layer by layer: only `step_loop_ms` (steps
back to back, one sync at the end, mean) shows that overlap, since the other step figures sync after every step.
`trainer` runs `automodel_convert.train.Trainer` (random init from the same config, `--init random`): the whole
training loop (EP dispatch, FSDP2 where there is more than one rank, fused AdamW, metrics); under torchrun every
rank runs it and rank 0 prints per-GPU figures (tokens/s per GPU, peak memory: the max over ranks).
Runs on torch >= 2.9 with transformers 5.17 .. 5.24; does not need the package to be installed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_comm import comm_exposure, profile_steps  # noqa: E402, F401 - comm_exposure: tests/test_bench_smoke.py

ROOT = Path(__file__).resolve().parent.parent
OVERLAP_PRIORITY = 0  # CUDA priority of the optimizer's side stream (--overlap-priority)
PEAK_TFLOPS = 790.0  # measured bf16 matmul ceiling of the H200 (shared/docs/moe-layouts.md)


def import_package() -> None:
    """Make `automodel_convert` importable from this checkout when it is not installed (the repo root IS the package)."""
    try:
        import automodel_convert  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "automodel_convert", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["automodel_convert"] = module
        spec.loader.exec_module(module)


def qwen3_config(layers: int, tiny: bool):  # noqa: ANN201
    from transformers import Qwen3MoeConfig

    if tiny:
        return Qwen3MoeConfig(
            vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
            norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=4096, rope_theta=1e6,
            tie_word_embeddings=False, output_router_logits=False, router_aux_loss_coef=0.001,
        )
    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=40960, rope_theta=1e6,
        tie_word_embeddings=False, output_router_logits=False, router_aux_loss_coef=0.001,
    )


def train_flops_per_token(cfg, seq: int) -> float:  # noqa: ANN001 - same formula as hf_v5_train_baseline.py
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    attn_proj = h * q + 2 * h * kv + q * h
    experts = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
    router = h * cfg.num_experts
    dense = layers * (attn_proj + experts + router) + h * cfg.vocab_size
    attn_scores = layers * 2 * q * seq / 2 * 2
    return 6 * dense + 3 * attn_scores


def balance_hf_routers(model: torch.nn.Module) -> int:
    """Give transformers' Qwen3-MoE routers the same round-robin assignment as our `balanced` gate."""
    from automodel_convert.models.common.router import balanced_indices

    def forward(self, hidden_states):  # noqa: ANN001, ANN202
        x = hidden_states.reshape(-1, self.weight.shape[1])
        logits = torch.nn.functional.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        idx = balanced_indices(x.shape[0], self.top_k, self.num_experts, x.device)
        top = probs.gather(1, idx)
        if getattr(self, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    n = 0
    for m in model.modules():
        if type(m).__name__.endswith("TopKRouter") and all(hasattr(m, a) for a in ("top_k", "num_experts", "weight")):
            m.forward = forward.__get__(m)
            n += 1
    if n == 0:
        raise RuntimeError("this transformers' Qwen3-MoE has no TopKRouter module to balance")
    return n


def build(kind: str, cfg, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> torch.nn.Module:  # noqa: ANN001
    if kind == "transformers":
        from transformers import Qwen3MoeForCausalLM

        cfg._attn_implementation = "sdpa"
        cfg._experts_implementation = "grouped_mm"
        with torch.device(device):
            model = Qwen3MoeForCausalLM(cfg).to(dtype)
        return model
    from automodel_convert.models import BackendConfig
    from automodel_convert.models.backend import as_backend
    from automodel_convert.models.qwen3_moe import Qwen3MoeForCausalLM as Ours

    backend = as_backend(args.backend) if args.backend else BackendConfig()
    if args.compile:
        backend = BackendConfig(**{**backend.__dict__, "compile": True})
    return Ours.from_config(cfg, backend, dtype=dtype, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module, device: torch.device, overlap: bool = False):  # noqa: ANN201
    params = [p for p in model.parameters() if p.requires_grad]
    if overlap:  # the same fused AdamW, stepped per parameter inside backward on a side stream (train/optim.py)
        from automodel_convert.train.optim import OverlappedAdamW

        return OverlappedAdamW(params, lr=1e-5, fused=device.type == "cuda", stream_priority=OVERLAP_PRIORITY)
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(params, lr=1e-5, foreach=device.type == "cuda")


def one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, device: torch.device) -> tuple[float, ...]:
    """One training step; returns (forward, backward, optimizer, whole step) seconds."""
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=tokens, labels=tokens)
    sync(device)
    t1 = time.perf_counter()
    out.loss.backward()
    sync(device)
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, t3 - t0


def run_trainer(gate: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The trainer's own loop on the benchmark's shapes (see the module docstring)."""
    import os
    import tempfile

    import torch.distributed as dist

    from automodel_convert.train import TrainArgs, Trainer

    cfg = qwen3_config(args.layers, args.tiny)
    with tempfile.TemporaryDirectory() as tmp:
        if int(os.environ.get("RANK", "0")) == 0 or not dist.is_initialized():
            cfg.save_pretrained(tmp)
        folder = tmp
        if dist.is_initialized():  # rank 0's folder name for everyone (the config is only read at start-up)
            obj = [tmp]
            dist.broadcast_object_list(obj, src=0)
            folder = obj[0]
        targs = TrainArgs(model=folder, init="random", ep=args.ep, seq=args.seq, batch=args.batch, steps=args.warmup + args.steps,
                          dtype=args.dtype, backend=args.backend, quiet=True, peak_tflops=PEAK_TFLOPS, ac=args.ac,
                          cuda_graphs=args.cuda_graphs, overlap_optimizer=args.overlap_optimizer, dispatcher=args.dispatcher,
                          reshard_after_forward=args.reshard_after_forward, grad_clip=0.0,  # as the recorded runs: no clipping
                          reduce_dtype=args.reduce_dtype)
        if args.fsdp_before:  # the FSDP arrangement before: head in the root unit, implicit prefetch only
            from automodel_convert.parallel import expert_parallel

            expert_parallel.separate_head = lambda model: None
            expert_parallel.prefetch_forward = lambda units: None
        trainer = Trainer(targs)
        if dist.is_initialized():
            dist.barrier()
    if gate == "balanced":
        trainer.model.set_gate("balanced")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    hist = trainer.run()[args.warmup :]
    exposure = profile_steps("trainer", gate, trainer.step, device, args.profile) if args.profile else {}
    if args.cprofile:
        python_profile(trainer.step, args.cprofile, f"{_trainer_label(args, trainer, gate)}, 3 steps")
    med = statistics.median
    step = med([m["step_ms"] for m in hist]) / 1e3
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0], device=device)
    if trainer.world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tps = args.batch * args.seq / step
    tflops = train_flops_per_token(cfg, args.seq) * tps / 1e12
    res = dict(
        impl=_trainer_label(args, trainer, gate), gate=gate,
        layers=args.layers, seq=args.seq, batch=args.batch, params_b=round(trainer.total_params / 1e9, 3), adamw="fused" if device.type == "cuda" else "foreach",
        fwd_ms=round(med([m["forward_ms"] for m in hist]), 2), bwd_ms=round(med([m["backward_ms"] for m in hist]), 2),
        fb_ms=round(med([m["forward_ms"] + m["backward_ms"] for m in hist]), 2), opt_ms=round(med([m["optimizer_ms"] for m in hist]), 2),
        step_ms=round(step * 1e3, 2), tps=round(tps), tflops=round(tflops, 1), mfu=round(tflops / PEAK_TFLOPS, 4),
        peak_gib=round(peak.item(), 2) if device.type == "cuda" else None, device=str(device), world=trainer.world, ep=args.ep,
        expert_load_max_over_mean=round(med([m.get("expert_load_max_over_mean", 0) for m in hist]), 3),
        torch=torch.__version__, transformers=__import__("transformers").__version__, dispatcher=trainer.dispatcher,
        reshard_after_forward=args.reshard_after_forward, grad_reduce={k: str(v).removeprefix("torch.") for k, v in getattr(trainer.model, "grad_reduce_dtypes", {}).items()},
        head_unit=not args.fsdp_before and trainer.world > 1, **exposure,
    )
    trainer = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def python_profile(step_fn, path: str, title: str, steps: int = 3) -> None:  # noqa: ANN001
    """`steps` calls of `step_fn` under cProfile: the Python functions by own time and by cumulative time, appended
    to `path` (where an EP step's host time goes; the torch profiler's table names aten ops, not Python)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step_fn()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(50)
    with open(path, "a") as f:
        f.write(f"\n===== cProfile: {title} =====\n{out.getvalue()}\n")


def _trainer_label(args: argparse.Namespace, trainer, gate: str) -> str:  # noqa: ANN001
    """The row's name: every option that changes how the trainer runs."""
    inner = [f"ep={args.ep}", f"world={trainer.world}"] + ([trainer.dispatcher] if args.ep > 1 else [])
    inner += ([] if args.reshard_after_forward else ["noreshard"]) + ([] if args.reduce_dtype == "auto" else [f"reduce={args.reduce_dtype}"])
    inner += (["fsdp-before"] if args.fsdp_before else []) + ([args.backend] if args.backend else [])
    inner += ["unfused-qk"] if args.unfused_qk else []
    tail = ("+graphs" if args.cuda_graphs else "") + ("+overlap" if args.overlap_optimizer else "") + ("+balanced" if gate == "balanced" else "")
    return f"trainer({','.join(inner)}){tail}"


def run(kind: str, gate: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    # memory still allocated by earlier runs of this process counts in this run's peak: collect what the previous
    # run left in reference cycles (the graph check's loss tensor keeps an autograd graph, and through it parameters
    # and graph buffers, alive until that run's frame is gone), then report what is still left beside the peak
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    left = round(torch.cuda.memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    res = _run(kind, gate, args, device, dtype)
    res["gib_left_by_earlier_runs"] = left
    return res


def _run(kind: str, gate: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    if kind.startswith("trainer"):  # trainer[_graphs][_overlap]: the flags, per run
        mods = kind.split("_")[1:]
        if not set(mods) <= {"graphs", "overlap"}:
            raise ValueError(f"unknown run {kind!r}: trainer[_graphs][_overlap]")
        targs = argparse.Namespace(**{**vars(args), "cuda_graphs": args.cuda_graphs or "graphs" in mods,
                                      "overlap_optimizer": args.overlap_optimizer or "overlap" in mods})
        return run_trainer(gate, targs, device, dtype)
    torch.manual_seed(0)
    cfg = qwen3_config(args.layers, args.tiny)
    base, *mods = kind.split("_")
    if base not in ("ours", "transformers") or not set(mods) <= {"graphs", "overlap", "defer"} or (base == "transformers" and "graphs" in mods):
        raise ValueError(f"unknown run {kind!r}: transformers[_overlap|_defer], ours[_graphs][_overlap|_defer] or trainer")
    graphs, defer = "graphs" in mods, "defer" in mods
    overlap = "overlap" in mods or defer
    model = build(base, cfg, device, dtype, args)
    model.train()
    loss_check = _capture_graphs(model, cfg, args, device) if graphs else None
    if gate == "balanced":
        if base == "transformers":
            balance_hf_routers(model)
        else:
            model.set_gate("balanced")
    opt = make_optimizer(model, device, overlap)
    if defer:  # the embeddings' and first half of the layers' updates overlap the next forward (train/optim.py)
        from automodel_convert.train.optim import input_side_modules

        opt.defer_until_forward(input_side_modules(model))
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = _time_steps(model, opt, tokens, device, args)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    if args.profile:
        profile_steps(kind, gate, lambda: one_step(model, opt, tokens, device), device, args.profile)
    res = _report(kind, gate, args, cfg, times, peak, device, overlap)
    res.update(loss_check=loss_check, params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
               adamw="fused" if opt.defaults.get("fused") else "foreach")
    if base == "ours":
        res["backend"] = model.backend.resolve(device, dtype).__dict__
    model = opt = tokens = None  # free the first model before the second is built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _capture_graphs(model: torch.nn.Module, cfg, args: argparse.Namespace, device: torch.device) -> dict:  # noqa: ANN001
    """Experimental CUDA graphs per decoder layer (models/common/graphs.py); the loss before and after capture (it
    must not change)."""
    from automodel_convert.models.common.graphs import graph_decoder_layers

    probe = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device, generator=torch.Generator(device=device).manual_seed(7))
    before = model(input_ids=probe, labels=probe).loss.item()
    graph_decoder_layers(model, args.batch, args.seq)
    after = model(input_ids=probe, labels=probe).loss
    after.backward()
    for p in model.parameters():
        p.grad = None
    return dict(before=round(before, 5), after=round(after.item(), 5))  # the graph of `after` is dropped on return


def _time_steps(model: torch.nn.Module, opt, tokens: torch.Tensor, device: torch.device, args: argparse.Namespace) -> dict:  # noqa: ANN001
    """Per-phase step times (synced), whole steps without inner syncs, and back-to-back steps (one sync at the end:
    what a training loop sustains; deferred updates overlap the next forward), in seconds."""
    phases: list[tuple[float, ...]] = []
    for i in range(args.warmup + args.steps):
        out = one_step(model, opt, tokens, device)
        if i >= args.warmup:
            phases.append(out)
    nosync = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        nosync.append(time.perf_counter() - t0)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    fwd, bwd, optim, step = (list(x) for x in zip(*phases))
    return dict(fwd=fwd, bwd=bwd, optim=optim, step=step, nosync=nosync, loop=(time.perf_counter() - t0) / args.steps)


def _report(kind: str, gate: str, args: argparse.Namespace, cfg, t: dict, peak: float | None, device: torch.device,  # noqa: ANN001
            overlap: bool) -> dict[str, Any]:
    """The result row of one run (medians in ms, tokens/s, model TFLOP/s and MFU)."""
    med = statistics.median
    tps = args.batch * args.seq / med(t["step"])
    tflops = train_flops_per_token(cfg, args.seq) * tps / 1e12
    res = dict(
        impl=kind + (f"+prio{OVERLAP_PRIORITY}" if overlap and OVERLAP_PRIORITY else "") + ("+balanced" if gate == "balanced" else ""),
        gate=gate, layers=args.layers, seq=args.seq, batch=args.batch,
        fwd_ms=round(med(t["fwd"]) * 1e3, 2), bwd_ms=round(med(t["bwd"]) * 1e3, 2),
        fb_ms=round(med([a + b for a, b in zip(t["fwd"], t["bwd"])]) * 1e3, 2), opt_ms=round(med(t["optim"]) * 1e3, 2),
        step_ms=round(med(t["step"]) * 1e3, 2), tps=round(tps), tflops=round(tflops, 1),
        mfu=round(tflops / PEAK_TFLOPS, 4), peak_gib=peak, device=str(device),
        step_nosync_ms=round(med(t["nosync"]) * 1e3, 2), tps_nosync=round(args.batch * args.seq / med(t["nosync"])),
        step_loop_ms=round(t["loop"] * 1e3, 2), tps_loop=round(args.batch * args.seq / t["loop"]),
        torch=torch.__version__, transformers=__import__("transformers").__version__,
    )
    if overlap:
        res["note"] = "AdamW stepped inside backward: bwd_ms includes the optimizer work, opt_ms is what remains after it"
    return res


RATIOS = ("fwd_ms", "bwd_ms", "fb_ms", "opt_ms", "step_ms", "step_nosync_ms", "step_loop_ms", "tps", "tflops", "peak_gib")


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("impl", "fwd_ms", "bwd_ms", "fb_ms", "opt_ms", "step_ms", "step_nosync_ms", "step_loop_ms", "tps", "tflops", "mfu", "peak_gib")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c)) for c in cols))
    by_impl = {r["impl"]: r for r in rows}
    for r in rows:
        if r["impl"].startswith("trainer") and "ours" + r["impl"].partition("+")[1] + r["impl"].partition("+")[2] in by_impl:
            base = by_impl["ours" + r["impl"].partition("+")[1] + r["impl"].partition("+")[2]]
            print(f"{r['impl']} tokens/s / zoo tokens/s: {r['tps'] / base['tps']:.3f}")
            print(json.dumps({"ratio": f"{r['impl']}/ours", "tps": round(r["tps"] / base["tps"], 3), "peak_gib": round((r["peak_gib"] or 0) / (base["peak_gib"] or 1), 3)}), flush=True)
    for gate_suffix in ("", "+balanced"):
        ref = by_impl.get("transformers" + gate_suffix)
        for impl, ours in by_impl.items():
            if not ref or impl == "transformers" + gate_suffix or impl.endswith("+balanced") != (gate_suffix == "+balanced"):
                continue
            name = impl.removesuffix(gate_suffix)
            ratio = {k: round(ours[k] / ref[k], 3) if ref[k] and ours.get(k) is not None else None for k in RATIOS}
            speed = {k: round(ref[k] / ours[k], 2) for k in ("fb_ms", "step_ms", "step_nosync_ms", "step_loop_ms") if ours.get(k) and ref.get(k)}
            print(f"ratio {name}/transformers{gate_suffix}: " + ", ".join(f"{k}={v}" for k, v in ratio.items()))
            print(f"speed-up {name}{gate_suffix}: forward+backward {speed.get('fb_ms')}x, full step {speed.get('step_ms')}x, "
                  f"full step without phase syncs {speed.get('step_nosync_ms')}x, back-to-back steps {speed.get('step_loop_ms')}x")
            print(json.dumps({"ratio": f"{name}/transformers" + gate_suffix, **ratio}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--gate", default="native", choices=["native", "balanced"], help="balanced: add labelled runs")
    ap.add_argument("--runs", default="transformers,ours", help="comma list of runs (order kept): transformers[_overlap], ours[_graphs][_overlap], trainer[_graphs][_overlap]")
    ap.add_argument("--ep", type=int, default=1, help="trainer runs: expert-parallel degree (under torchrun)")
    ap.add_argument("--ac", action="store_true", help="trainer runs: activation checkpointing")
    ap.add_argument("--dispatcher", default="auto", help="trainer runs with ep > 1: auto, alltoall, deepep or deepep_static")
    ap.add_argument("--no-reshard", dest="reshard_after_forward", action="store_false", help="trainer runs: FSDP2 reshard_after_forward=False")
    ap.add_argument("--reduce-dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="trainer runs: gradient reduce dtype")
    ap.add_argument("--fsdp-before", action="store_true", help="trainer runs: the FSDP arrangement before (head in the root unit, no explicit forward prefetch)")
    ap.add_argument("--cuda-graphs", action="store_true", help="trainer runs: CUDA graphs per decoder layer (one GPU)")
    ap.add_argument("--overlap-optimizer", action="store_true", help="trainer runs: AdamW stepped inside backward (one GPU)")
    ap.add_argument("--backend", default="", help="our BackendConfig as key=value,... (default: all auto)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our per-layer dense parts")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--profile", default="", help="append a torch profiler summary of each run to this file")
    ap.add_argument("--unfused-qk", action="store_true", help="run q/k norm and rope as separate kernels (A/B of their fusion)")
    ap.add_argument("--cprofile", default="", help="trainer runs: append a cProfile of 3 more steps to this file")
    ap.add_argument("--overlap-priority", type=int, default=0, help="_overlap runs: the side stream's CUDA priority (-1: high)")
    args = ap.parse_args(argv)
    global OVERLAP_PRIORITY
    OVERLAP_PRIORITY = args.overlap_priority
    import_package()
    if args.unfused_qk:  # the separate q/k norm and rope kernels, for an A/B of their fusion
        from automodel_convert.models.common import attention

        attention.FUSE_QK_NORM_ROPE = False
    import os

    if "LOCAL_RANK" in os.environ and args.device == "cuda":  # torchrun: one GPU per rank
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    else:
        device = torch.device(args.device)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    dtype = getattr(torch, args.dtype)
    if args.profile:
        Path(args.profile).write_text(f"train_bench profile: {vars(args)}\n")
    gates = ["native"] + (["balanced"] if args.gate == "balanced" else [])
    rows = []
    for gate in gates:
        for kind in args.runs.split(","):
            try:
                res = run(kind.strip(), gate, args, device, dtype)
            except Exception as e:  # report and go on with the other runs
                res = dict(impl=kind + ("+balanced" if gate == "balanced" else ""), error=repr(e)[:500])
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if rank0:
                print(json.dumps(res), flush=True)
            if "error" not in res:
                rows.append(res)
    if rank0:
        print_table(rows)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
