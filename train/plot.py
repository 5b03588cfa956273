"""`automodel-train plot RUN [--out DIR]`: PNG charts of a run's `metrics.jsonl` (matplotlib, optional extra `plot`).

Contract: reads `RUN/metrics.jsonl` (or RUN itself when it is a file); writes one PNG per metric present
(loss with eval loss, learning rate, gradient norm, tokens/s, expert load balance) to `--out` (default `RUN/plots`)
and prints each path. A missing file or matplotlib is a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import TrainError

CHARTS = (("loss", ("loss", "eval_loss"), "loss"), ("lr", ("lr",), "learning rate"), ("grad_norm", ("grad_norm",), "gradient norm"),
          ("throughput", ("tokens_per_s_per_gpu", "tokens_per_s"), "tokens/s"), ("expert_load", ("expert_load_max_over_mean",), "max / mean expert load"))


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and '"step"' in line]


def plot(run: Path, out: Path | None = None) -> list[Path]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise TrainError(f"plot {run}: no metrics.jsonl there")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainError("plot needs matplotlib: pip install 'automodel-convert[plot]'") from None
    rows = load(path)
    out = out or (path.parent / "plots")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys, ylabel in CHARTS:
        series = [(k, [(r["step"], r[k]) for r in rows if k in r]) for k in keys]
        series = [(k, pts) for k, pts in series if pts]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        for k, pts in series[: 2 if name == "loss" else 1]:
            ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def plot_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="automodel-train plot")
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    for p in plot(a.run, a.out):
        print(p)
    return 0
