"""Host (CPU) cost of one decoder layer's forward + backward, per component, beside its GPU time.

    python bench/host_overhead.py                          # one GPU: Qwen3-30B-A3B layer shapes
    python bench/host_overhead.py --backend expert_recompute=1
    python bench/host_overhead.py --device cpu --tiny      # CPU smoke test (host and device are the same there)

An EP step that leaves the GPU idle half the time (`gpu_idle_ms` of `train_bench --profile`) is bound by the host's
work of issuing kernels. This script measures that work directly, one module at a time, for the zoo's Qwen3-MoE
decoder layer (bf16, the back-end given by `--backend`, the local dispatcher):
- `host_us`: CPU wall time to issue one forward + backward, with `--small-seq` tokens (kernels short enough that
  the launch queue never fills, so the wall time is the host's own); `gpu_us` is the GPU's time over the same calls
  (CUDA events). When the host is the bottleneck the GPU waits for it and `gpu_us` follows `host_us`; a row whose
  `gpu_us` clearly exceeds `host_us` (> 1.2x) is marked `gpu-bound`: its host figure is then an upper bound;
- `kernels`: device kernels launched by that forward + backward (torch profiler);
- `real_host_us` / `real_gpu_us`: the same forward + backward at `--seq` tokens: the host's issue time against the
  GPU's time (CUDA events). A layer whose real_host_us approaches real_gpu_us cannot keep the GPU busy.
Components: the whole layer, its input RMSNorm, attention, router, experts (router output fixed), and the MoE
block. One JSON line per component, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import import_package, qwen3_config  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], iters: int, device: torch.device) -> tuple[float, float]:
    """(host µs, device µs) per call of `fn`, over `iters` calls issued back to back."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e6
    if device.type != "cuda":
        return host, host
    end.record()
    torch.cuda.synchronize(device)
    return host, start.elapsed_time(end) * 1e3 / iters


def _kernel_count(fn: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def components(model: torch.nn.Module, seq: int, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """name -> a closure that runs that module's forward + backward once on fresh inputs of `seq` tokens."""
    from automodel_convert.models.common.attention import Masks

    layer = model.model.layers[0]
    hidden = model.config.hidden_size
    x = torch.randn(1, seq, hidden, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(seq, device=device)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    masks = Masks(None, seq, device)
    flat = x.detach().reshape(-1, hidden).requires_grad_(True)
    router = layer.mlp.get_router()
    with torch.no_grad():
        routing = router(flat)
    grad = torch.randn(1, seq, hidden, device=device, dtype=dtype)

    def backward(y: torch.Tensor, g: torch.Tensor) -> None:
        y.backward(g)

    def run_layer() -> None:
        y, _ = layer(x, cos, sin, masks)
        backward(y, grad)

    def run_norm() -> None:
        backward(layer.input_layernorm(x), grad)

    def run_attn() -> None:
        backward(layer.self_attn(x, cos, sin, masks), grad)

    def run_router() -> None:
        r = router(flat)
        r.weights.float().sum().backward()

    def run_experts() -> None:
        backward(layer.mlp.experts(flat, routing.indices, routing.weights), grad.view(-1, hidden))

    def run_moe() -> None:
        y, _ = layer.mlp(x)
        backward(y, grad)

    return {"layer": run_layer, "rms_norm": run_norm, "attention": run_attn, "router": run_router,
            "experts": run_experts, "moe_block": run_moe}


def one_layer_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.device, torch.dtype]:
    """The zoo's Qwen3-MoE with one decoder layer, on `--device` (bf16 on CUDA), back-end `--backend`, training mode."""
    import_package()
    from automodel_convert.models.backend import as_backend
    from automodel_convert.models.qwen3_moe import Qwen3MoeForCausalLM

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = qwen3_config(1, args.tiny)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM.from_config(cfg, as_backend(args.backend or None), dtype=dtype, device=device)
    return model.train(), device, dtype


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, device, dtype = one_layer_model(args)
    small = components(model, args.small_seq, device, dtype)
    real = components(model, args.seq, device, dtype)
    from automodel_convert.models.common import attention

    variants = {"fused-qk": True, "unfused-qk": False} if args.ab_qk else {"": attention.FUSE_QK_NORM_ROPE}
    rows = []
    for name in small:
        host: dict[str, list] = {v: [] for v in variants}
        big: dict[str, list] = {v: [] for v in variants}
        for fuse in variants.values():  # warm-up, then the variants interleaved round by round (A/B/A/B...)
            attention.FUSE_QK_NORM_ROPE = fuse
            for fn in (small[name], real[name]):
                for _ in range(args.warmup):
                    fn()
        for _ in range(args.repeat):
            for variant, fuse in variants.items():
                attention.FUSE_QK_NORM_ROPE = fuse
                host[variant].append(_timed(small[name], args.iters, device))
                big[variant].append(_timed(real[name], max(1, args.iters // 5), device))
        for variant, fuse in variants.items():
            attention.FUSE_QK_NORM_ROPE = fuse
            host_us, gpu_us = (statistics.median(v) for v in zip(*host[variant]))
            real_host_us, real_gpu_us = (statistics.median(v) for v in zip(*big[variant]))
            rows.append({
                "component": name + (f" {variant}" if variant else ""), "host_us": round(host_us, 1), "gpu_us": round(gpu_us, 1),
                "gpu_bound": device.type == "cuda" and gpu_us > 1.2 * host_us, "kernels": _kernel_count(small[name], device),
                "real_host_us": round(real_host_us, 1), "real_gpu_us": round(real_gpu_us, 1),
                "seq": args.seq, "small_seq": args.small_seq, "backend": args.backend or "default", "device": str(device),
                "torch": torch.__version__,
            })
        attention.FUSE_QK_NORM_ROPE = True
        model.zero_grad(set_to_none=True)
    return rows


def micro(device: torch.device, iters: int) -> list[dict[str, Any]]:
    """Host µs per call of the building blocks (tiny tensors): an aten op, a Triton launch through `JITFunction`
    and through its cached `CompiledKernel`, the RMSNorm autograd Function forward and forward + backward, the same
    computation in plain torch, and an empty autograd Function."""
    if device.type != "cuda":
        return []
    import triton

    from automodel_convert.models.common import kernels
    from automodel_convert.models.common.norms import rms_norm_reference

    x = torch.randn(8, 128, device=device, dtype=torch.bfloat16)
    w = torch.ones(128, device=device, dtype=torch.bfloat16, requires_grad=True)
    y, rstd = torch.empty_like(x), torch.empty(8, device=device)
    xg = x.clone().requires_grad_(True)
    g = torch.ones_like(x)

    def jit() -> None:
        kernels._rms_fwd[(8,)](x, w, y, rstd, 128, 128, 128, 1e-6, BLOCK=128, num_warps=1)

    compiled = kernels._rms_fwd[(8,)](x, w, y, rstd, 128, 128, 128, 1e-6, BLOCK=128, num_warps=1)
    runner = compiled[(8, 1, 1)]

    def cached() -> None:
        runner(x, w, y, rstd, 128, 128, 128, 1e-6, 128)

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):  # noqa: ANN001, ANN205
            return t.view_as(t)

        @staticmethod
        def backward(ctx, d):  # noqa: ANN001, ANN205
            return d

    cases = {
        "aten add": lambda: torch.add(x, x),
        "triton launch (JITFunction)": jit,
        "triton launch (cached CompiledKernel)": cached,
        "rms_norm Function fwd (no grad)": lambda: kernels.rms_norm(x, w.detach(), 1e-6),
        "rms_norm Function fwd+bwd": lambda: kernels.rms_norm(xg, w, 1e-6).backward(g),
        "rms_norm torch fwd+bwd": lambda: rms_norm_reference(xg, w, 1e-6).backward(g),
        "empty Function fwd+bwd": lambda: Empty.apply(xg).backward(g),
    }
    # EP=2's combine at Qwen3-30B-A3B shapes: 8192 received tokens x 8 slots over 32768 rows, half the slots empty
    src = torch.randn(32768, 2048, device=device, dtype=torch.bfloat16)
    slots = torch.randperm(8192 * 8, device=device) % 32768
    slots[torch.rand(slots.numel(), device=device) < 0.5] = 32768
    cases["EP sum_slots: gather_sum, empty slot masked"] = lambda: kernels.gather_sum(src, slots, 8)
    cases["EP sum_slots: cat a zero row, then gather_sum"] = lambda: kernels.gather_sum(torch.cat([src, src.new_zeros(1, 2048)]), slots, 8)
    rows = []
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        times = [_timed(fn, iters, device) for _ in range(5)]
        rows.append({"micro": name, "host_us": round(statistics.median(t[0] for t in times), 1),
                     "gpu_us": round(statistics.median(t[1] for t in times), 1), "triton": triton.__version__})
    return rows


def op_counts(args: argparse.Namespace) -> str:
    """The aten ops of the attention, MoE block and RMSNorm forward + backward, by count (Triton kernels are not
    aten ops and do not appear)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    model, device, dtype = one_layer_model(args)
    fns = components(model, args.small_seq, device, dtype)
    counts: collections.Counter = collections.Counter()

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):  # noqa: ANN001, ANN204
            counts[str(func.overloadpacket.__name__)] += 1
            return func(*a, **(kw or {}))

    out = []
    for name in ("attention", "moe_block", "rms_norm"):
        fns[name]()
        counts.clear()
        with Log():
            fns[name]()
        out.append(f"{name}: {sum(counts.values())} aten ops: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return "\n".join(out)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'component':<22} {'host us':>9} {'kernels':>8} {'us/kernel':>10} {'real host us':>13} {'real GPU us':>12}  note")
    for r in rows:
        k = r["kernels"]
        per = f"{r['host_us'] / k:.1f}" if k else "-"
        note = "gpu-bound at small seq" if r["gpu_bound"] else ""
        print(f"{r['component']:<22} {r['host_us']:>9.1f} {k if k is not None else '-':>8} {per:>10} "
              f"{r['real_host_us']:>13.1f} {r['real_gpu_us']:>12.1f}  {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="", help="BackendConfig string, e.g. 'expert_recompute=1'")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--small-seq", type=int, default=64, help="tokens for the host-time rows (GPU work negligible)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--micro", action="store_true", help="first, host µs of single launches (CUDA only)")
    p.add_argument("--micro-only", action="store_true", help="with --micro: only those rows")
    p.add_argument("--ops", action="store_true", help="only list the aten ops of attention, MoE block, RMSNorm by count")
    p.add_argument("--ab-qk", action="store_true", help="each component with the fused q/k norm + rope kernel and without, interleaved")
    p.add_argument("--json", type=Path, help="also write the rows here, one JSON line each")
    args = p.parse_args(argv)
    if args.ops:
        print(op_counts(args))
        return 0
    if args.micro:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        import_package()
        for r in micro(device, 200):
            print(json.dumps(r))
        if args.micro_only:
            return 0
    rows = measure(args)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
