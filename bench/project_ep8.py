"""A PROJECTION, not a measurement: EP=8 against transformers FSDP2 dp=8 for the full 48-layer Qwen3-30B-A3B on 8 GPUs,
from per-layer figures measured on 2 H200s (bench/ep2_compare.sh at 8 and 16 layers, plus the ep=1 one-GPU step).

    python bench/project_ep8.py                      # the inputs recorded in docs/BENCHMARKS.md
    python bench/project_ep8.py --ours-fb 98.59 170.0 ...   # other measured inputs (see --help)

Model (per GPU, 4096 tokens per GPU at every scale, so matmul work per GPU is the same at EP=2 and EP=8):
- per layer, a depth pair (8, 16) gives `per_layer = (t16 - t8) / 8` and `fixed = t8 - 8 * per_layer`.
- ours: forward+backward per layer = the ep=1 compute per layer + the EP=2 overhead per layer, whose byte-moving part
  (DeepEP dispatch + combine kernels, from the profile) scales with the remote ranks a token is sent to (uniform
  top-8 of 128 experts: 0.996 remote ranks at EP=2, 4.65 at EP=8) and whose synchronisation part (notify kernels,
  waiting for the slower rank) stays. The optimizer per layer scales with the experts held (1/ep). The fixed part's
  FSDP traffic (embedding and output head) scales with (n-1)/n: x1.75 from 2 to 8 ranks.
- transformers FSDP2: its per-layer time is assumed compute-bound at dp=8 as at dp=2 (its per-layer traffic grows
  x1.75 but stays below its per-layer compute at the same NVLink bandwidth); its fixed part's traffic scales x1.75.
Bandwidth per GPU is taken as equal on 2 and 8 GPUs (NVSwitch); load is taken as uniform (a skewed router moves
fewer bytes at EP=2 and more waiting at EP=8). Everything the model leaves out makes this an estimate, labelled so.
"""

from __future__ import annotations

import argparse
from math import comb


def remote_ranks(ep: int, experts: int = 128, top_k: int = 8) -> float:
    """Expected ranks other than the token's own that hold at least one of its top-k experts (uniform routing)."""
    per_rank = experts // ep
    p_none = comb(experts - per_rank, top_k) / comb(experts, top_k)
    return (ep - 1) * (1 - p_none)


def per_layer(t8: float, t16: float) -> tuple[float, float]:
    layer = (t16 - t8) / 8
    return layer, t8 - 8 * layer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ours-fb", nargs=2, type=float, default=[98.59, 170.0], help="EP=2 forward+backward ms at 8 and 16 layers")
    ap.add_argument("--ours-opt", nargs=2, type=float, default=[14.85, 27.93], help="EP=2 optimizer ms at 8 and 16 layers")
    ap.add_argument("--ours-step", nargs=2, type=float, default=[113.7, 199.3], help="EP=2 step ms at 8 and 16 layers")
    ap.add_argument("--ep1-fb", nargs=2, type=float, default=[55.8, 105.64], help="ep=1 one-GPU forward+backward ms at 8 and 16 layers")
    ap.add_argument("--ep1-opt", nargs=2, type=float, default=[30.43, 58.78], help="ep=1 one-GPU optimizer ms")
    ap.add_argument("--ep1-step", nargs=2, type=float, default=[87.98, 166.64], help="ep=1 one-GPU step ms")
    ap.add_argument("--hf-step", nargs=2, type=float, default=[190.4, 337.1], help="transformers FSDP2 dp=2 step ms at 8 and 16 layers")
    ap.add_argument("--deepep-bytes-ms", type=float, default=7.5 / 8, help="DeepEP dispatch+combine kernel ms per layer at EP=2 (profile)")
    ap.add_argument("--layers", type=int, default=48)
    a = ap.parse_args()

    fb1, _ = per_layer(*a.ep1_fb)
    fb2, _ = per_layer(*a.ours_fb)
    opt1, _ = per_layer(*a.ep1_opt)
    _, fixed1 = per_layer(*a.ep1_step)
    step2, fixed2 = per_layer(*a.ours_step)
    hf_layer, hf_fixed = per_layer(*a.hf_step)
    overhead = fb2 - fb1  # EP=2's per-layer cost over one GPU's compute
    scale = remote_ranks(8) / remote_ranks(2)
    ours_layer = fb1 + a.deepep_bytes_ms * scale + (overhead - a.deepep_bytes_ms) + opt1 / 8
    ours_fixed = fixed1 + (fixed2 - fixed1) * 1.75
    hf_fixed8 = hf_fixed * 1.75
    ours = a.layers * ours_layer + ours_fixed
    hf = a.layers * hf_layer + hf_fixed8
    print("PROJECTION (not measured): EP=8 vs transformers FSDP2 dp=8, 8 GPUs, 48 layers, seq 4096, batch 1 per GPU")
    print(f"inputs per layer: ep=1 fwd+bwd {fb1:.2f} ms, EP=2 fwd+bwd {fb2:.2f} ms (EP overhead {overhead:.2f}), ep=1 optimizer {opt1:.2f} ms, "
          f"transformers dp=2 step {hf_layer:.2f} ms; fixed: ep=1 {fixed1:.1f}, EP=2 {fixed2:.1f}, transformers {hf_fixed:.1f} ms")
    print(f"remote ranks per token: EP=2 {remote_ranks(2):.3f}, EP=8 {remote_ranks(8):.2f} (x{scale:.2f} dispatch bytes)")
    print(f"ours EP=8: {ours_layer:.2f} ms/layer + {ours_fixed:.1f} ms fixed = {ours:.0f} ms/step, {4096 / ours * 1e3:,.0f} tok/s/GPU")
    print(f"transformers FSDP2 dp=8: {hf_layer:.2f} ms/layer + {hf_fixed8:.1f} ms fixed = {hf:.0f} ms/step, {4096 / hf * 1e3:,.0f} tok/s/GPU")
    print(f"projected speed-up: {hf / ours:.2f}x (the seed article reports 3.69x on 8xH100 against its baseline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
