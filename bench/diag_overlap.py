"""Diagnostics for AdamW inside backward on one GPU (not a benchmark of record).

    python3 bench/diag_overlap.py

1) The zoo model with OverlappedAdamW under the variants in which the trainer's loop differs from train_bench's:
   optimizer hyperparameters, fresh vs fixed tokens, `labels` vs `shift_labels`; median step ms of each.
2) What keeps a CUDA-graphed model's memory allocated after it is dropped (allocated GiB after each clean-up step).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import import_package, qwen3_config  # noqa: E402


def steps(model, opt, make_batch, n: int = 12, warm: int = 3, shift: bool = False) -> float:  # noqa: ANN001
    times = []
    for i in range(warm + n):
        ids = make_batch()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if shift:
            loss = model(input_ids=ids, shift_labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    import_package()
    from automodel_convert.models import BackendConfig
    from automodel_convert.models.qwen3_moe import Qwen3MoeForCausalLM
    from automodel_convert.train.optim import OverlappedAdamW

    dev = torch.device("cuda")
    cfg = qwen3_config(8, False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM.from_config(cfg, BackendConfig(), dtype=torch.bfloat16, device=dev)
    model.train()
    fixed = torch.randint(0, cfg.vocab_size, (1, 4096), device=dev)
    gen = torch.Generator(device=dev).manual_seed(1)

    def fresh():  # noqa: ANN202
        return torch.randint(0, cfg.vocab_size, (1, 4096), device=dev, generator=gen)

    variants = [
        ("bench: wd 0.01, betas (0.9, 0.999), fixed tokens, labels", dict(lr=1e-5), lambda: fixed, False),
        ("trainer hyperparameters: wd 0, betas (0.9, 0.95)", dict(lr=1e-5, weight_decay=0.0, betas=(0.9, 0.95)), lambda: fixed, False),
        ("fresh random tokens each step", dict(lr=1e-5), fresh, False),
        ("shift_labels", dict(lr=1e-5), lambda: fixed, True),
        ("trainer-like: all three", dict(lr=1e-5, weight_decay=0.0, betas=(0.9, 0.95)), fresh, True),
        ("standard AdamW (fused) for reference", None, lambda: fixed, False),
    ]
    for name, kw, batch, shift in variants * 2:
        if kw is None:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        else:
            opt = OverlappedAdamW(model.parameters(), fused=True, **kw)
        ms = steps(model, opt, batch, shift=shift)
        print(f"{ms:8.2f} ms  {name}", flush=True)
        if kw is not None:
            opt.remove_hooks()
        del opt
        gc.collect()
        torch.cuda.empty_cache()

    # 2) a graphed model's memory after it is dropped
    from automodel_convert.models.common.graphs import graph_decoder_layers

    def gib() -> float:
        return round(torch.cuda.memory_allocated() / 2**30, 2)

    print("before graphs", gib())
    graph_decoder_layers(model, 1, 4096)
    model(input_ids=fixed, labels=fixed).loss.backward()
    for p in model.parameters():
        p.grad = None
    print("graphed, after one step", gib())
    model = None
    gc.collect()
    torch.cuda.empty_cache()
    print("model dropped + gc + empty_cache", gib())
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    print("after synchronize + gc + empty_cache", gib())
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    del x
    print("after one 1 GiB allocation", gib())
    big = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda]
    print("live CUDA tensors seen by gc:", len(big), "GiB:", round(sum(t.numel() * t.element_size() for t in big) / 2**30, 2))
    for t in sorted(big, key=lambda t: -t.numel() * t.element_size())[:5]:
        refs = [type(r).__name__ for r in gc.get_referrers(t)][:6]
        print("  ", tuple(t.shape), t.dtype, "referrers:", refs)


if __name__ == "__main__":
    main()
