"""Bar charts of `bench/ep2_compare.sh` calls: tokens/s per GPU and peak memory of every system, one panel per call.

    .venv/bin/python bench/plot_ep2.py docs/data/ep2_session19_call{A,B,C} --out docs/img/ep2_h200x2.png

Each folder is one call's results (what `bench/ep2_session.sh` bundles in results.tar); the rows are read with
`bench/ep2_summary.py`, so the chart shows exactly the figures of the summary tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ep2_summary import rows_for  # noqa: E402


def _label(r: dict) -> str:
    name = r["system"].replace("transformers FSDP2 dp=2", "transformers\nFSDP2").replace("NeMo AutoModel (deepep)", "NeMo\n(DeepEP)")
    name = name.replace("ours trainer(ep=2,world=2,deepep,noreshard", "ours EP=2").replace("ours trainer(ep=1,world=1)", "ours ep=1\n(1 GPU)")
    name = name.replace("ours trainer(ep=2,world=2,deepep_static,noreshard", "ours EP=2\nstatic").replace(",expert_recompute=1", "\nrecompute")
    name = name.replace(",reduce=float32,fsdp-before)", "\nbefore").replace(")+overlap", "\n+overlap").replace(")", "")
    name = name.replace("(1 GPU", "(1 GPU)").replace("(DeepEP", "(DeepEP)")
    return name + ("\nbalanced" if r["gate"] == "balanced" else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("calls", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for folder in args.calls:
        for f in sorted(folder.glob("hf_fsdp_*l.txt")):
            layers = int(f.name.split("_")[-1].removesuffix("l.txt"))
            panels.append((f"{folder.name}, {layers} layers", rows_for(folder, layers)))
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False)
    for j, (title, rows) in enumerate(panels):
        labels = [_label(r) for r in rows]
        colors = ["tab:gray" if "transformers" in lab else "tab:green" if "NeMo" in lab else "tab:blue" for lab in labels]
        for i, (key, unit) in enumerate((("tps", "tokens/s per GPU"), ("peak_gib", "peak GiB (max over ranks)"))):
            ax = axes[i][j]
            vals = [r.get(key) or 0 for r in rows]
            ax.bar(range(len(rows)), vals, color=colors)
            for x, v in enumerate(vals):
                ax.text(x, v, f"{v:,.0f}" if key == "tps" else f"{v:.1f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(rows)), labels, fontsize=6)
            ax.set_ylabel(unit)
            if i == 0:
                ax.set_title(title)
    fig.suptitle("EP=2 on 2x H200 vs transformers FSDP2 dp=2 and NeMo AutoModel (Qwen3-30B-A3B shapes, seq 4096)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
