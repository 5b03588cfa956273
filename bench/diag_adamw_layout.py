"""Diagnostic: fused AdamW step time on the 8-layer Qwen3-MoE-shaped model's parameters, by how the parameters are
grouped (one group in model order; expert tensors and the rest in two groups; one optimizer per parameter). One
H200; not a benchmark of record.

    python3 bench/diag_adamw_layout.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import build, import_package, qwen3_config  # noqa: E402


def step_ms(step, n: int = 8) -> float:  # noqa: ANN001
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[3:]) * 1e3


def run_kind(kind: str, cfg, dev: torch.device, tokens: torch.Tensor) -> None:  # noqa: ANN001
    import argparse

    torch.manual_seed(0)
    model = build(kind, cfg, dev, torch.bfloat16, argparse.Namespace(backend="", compile=False))
    model(input_ids=tokens, labels=tokens).loss.backward()  # gradients stay; only the optimizer is timed
    params = list(model.parameters())
    big = [p for p in params if p.dim() == 3]
    rest = [p for p in params if p.dim() != 3]
    by_size = sorted(params, key=lambda p: -p.numel())
    variants = {
        "one group, model order": lambda: torch.optim.AdamW(params, lr=1e-5, fused=True),
        "two groups: 3-D expert tensors, the rest": lambda: torch.optim.AdamW([{"params": big}, {"params": rest}], lr=1e-5, fused=True),
        "one group, sorted by size": lambda: torch.optim.AdamW(by_size, lr=1e-5, fused=True),
    }
    for name, make in list(variants.items()) * 2:
        opt = make()
        print(f"{kind}: {step_ms(opt.step):6.2f} ms  {name}", flush=True)
    per = [torch.optim.AdamW([p], lr=1e-5, fused=True) for p in params]

    def step_all() -> None:
        for o in per:
            o.step()

    print(f"{kind}: {step_ms(step_all):6.2f} ms  one optimizer per parameter", flush=True)


def main() -> None:
    import gc

    import_package()
    cfg = qwen3_config(8, False)
    dev = torch.device("cuda")
    tokens = torch.randint(0, cfg.vocab_size, (1, 4096), device=dev)
    for kind in ("ours", "transformers"):
        run_kind(kind, cfg, dev, tokens)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
