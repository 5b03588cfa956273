"""Bar charts of `bench/train_bench.py` output (its JSON lines): tokens/s per GPU and peak memory per run.

    .venv/bin/python bench/plot_bench.py docs/data/train_bench_h200_8l.txt --out docs/img/train_bench_h200_8l.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{") and '"impl"' in line:
            r = json.loads(line)
            if "error" not in r:
                out.append(r)
    return out


def save_figure(fig, out: Path) -> None:  # noqa: ANN001 - a matplotlib Figure
    """Lay out, write (creating the folder) and print the path; shared by the bench's plot scripts."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--wrap", action="store_true", help="one name part per line (many runs)")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(a.file)
    names = [r["impl"].replace("_", "\n").replace("+", "\n+").replace("(ep=1,world=1)", "") for r in data] if a.wrap else [r["impl"].replace("+balanced", "\n+balanced").replace("(ep=", "\n(ep=").replace(",world=", ", world=") for r in data]
    colors = ["#888888" if r["impl"].startswith("transformers") else "#1f77b4" if r["impl"].startswith("ours") else "#2ca02c" for r in data]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=120)
    for r in data:  # memory an earlier run of the same process left allocated is not this run's
        r["peak_own_gib"] = (r.get("peak_gib") or 0) - (r.get("gib_left_by_earlier_runs") or 0)
    for ax, key, label in ((axes[0], "tps", "tokens/s per GPU"), (axes[1], "peak_own_gib", "peak memory (GiB)")):
        vals = [r.get(key) or 0 for r in data]
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if key == "tps" else f"{v:.1f}" for v in vals], fontsize=7)
        ax.set_xticks(range(len(vals)), names, fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    first = data[0] if data else {}
    fig.suptitle(a.title or f"train_bench: {first.get('layers')} layers, seq {first.get('seq')}, batch {first.get('batch')}, {first.get('device')}", fontsize=9)
    save_figure(fig, a.out)


if __name__ == "__main__":
    main()
