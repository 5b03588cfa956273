"""Turn the trainer's JSON-lines metrics into PNG charts (loss, tokens/s per GPU).

    .venv/bin/python bench/plot_metrics.py run/metrics.jsonl [more.jsonl ...] --out docs/img/train
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and '"step"' in line]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img/train"))
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a.out.mkdir(parents=True, exist_ok=True)
    for metric, ylabel, name in (("loss", "loss", "loss.png"), ("tokens_per_s_per_gpu", "tokens/s per GPU", "throughput.png")):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        for f in a.files:
            rows = [r for r in load(f) if metric in r]
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], label=f.stem)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out / name)
        print(a.out / name)


if __name__ == "__main__":
    main()
