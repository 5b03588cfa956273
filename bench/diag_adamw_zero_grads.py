"""Diagnostic: torch's fused AdamW step time on Qwen3-30B-A3B-shaped tensors (8 layers of fused experts plus the
embeddings, bf16) by gradient values. Zero or tiny gradients (experts that received no tokens) are slower than
ordinary ones. One H200; output in docs/data/overlap_h200/diag_adamw_zero_grads.txt.

    python3 bench/diag_adamw_zero_grads.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

SHAPES = [(128, 1536, 2048), (128, 2048, 768)] * 8 + [(151936, 2048)] * 2


def step_ms(params: list[torch.nn.Parameter], fill: Callable[[torch.Tensor], torch.Tensor]) -> float:
    for p in params:
        p.grad = fill(p)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    times = []
    for _ in range(8):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1e3


def half_the_experts_zero(p: torch.Tensor) -> torch.Tensor:
    g = torch.randn_like(p) * 1e-3
    if p.dim() == 3:
        g[: p.shape[0] // 2] = 0
    return g


def main() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02) for s in SHAPES]
    fills = [
        ("random grads", lambda p: torch.randn_like(p) * 1e-3),
        ("all-zero grads", torch.zeros_like),
        ("half the experts zero", half_the_experts_zero),
        ("tiny grads 1e-20", lambda p: torch.randn_like(p) * 1e-20),
        ("random grads again", lambda p: torch.randn_like(p) * 1e-3),
    ]
    for name, fill in fills:
        print(f"{step_ms(params, fill):7.2f} ms  {name}", flush=True)


if __name__ == "__main__":
    main()
