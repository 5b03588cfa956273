"""Chart of `bench/convert_bench.py` output: median wall time of cp -r, merge and split per depth (runs as dots),
and peak RSS.

    .venv/bin/python bench/plot_convert.py docs/data/convert_bench_cpu.txt --out docs/img/convert_bench_cpu.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from plot_bench import save_figure

STEPS = ("cp -r", "merge", "split")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in a.file.read_text().splitlines() if line.startswith('{"step"')]
    depths = sorted({r["layers"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    width = 0.25
    colors = {"cp -r": "#888888", "merge": "#1f77b4", "split": "#2ca02c"}
    for k, st in enumerate(STEPS):
        for d_i, d in enumerate(depths):
            runs = [r["wall_s"] for r in rows if r["layers"] == d and r["step"] == st]
            rss = max(r["peak_rss_mb"] for r in rows if r["layers"] == d and r["step"] == st)
            x = d_i + (k - 1) * width
            med = statistics.median(runs)
            axes[0].bar(x, med, width, color=colors[st], label=st if d_i == 0 else None)
            axes[0].plot([x] * len(runs), runs, "k.", ms=3)
            axes[0].text(x, med, f"{med:.2f}", ha="center", va="bottom", fontsize=7)
            axes[1].bar(x, rss, width, color=colors[st], label=st if d_i == 0 else None)
            axes[1].text(x, rss, f"{rss:.0f}", ha="center", va="bottom", fontsize=7)
    gb = {d: next(r["gb"] for r in rows if r["layers"] == d) for d in depths}
    for ax, label in ((axes[0], "wall time, s (median; dots: runs)"), (axes[1], "peak RSS, MB")):
        ax.set_xticks(range(len(depths)), [f"{d} layers ({gb[d]} GB)" for d in depths])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].axhline(300, color="r", lw=0.8, ls="--")
    axes[1].text(-0.4, 300, "target 300 MB", color="r", fontsize=7, va="bottom")
    fig.suptitle("merge / split of a Qwen3-30B-A3B-shaped checkpoint vs cp -r (2-core CPU VM, each step its own process)", fontsize=9)
    save_figure(fig, a.out)


if __name__ == "__main__":
    main()
