"""Read one `bench/ep2_compare.sh` call's results and print ours, NeMo AutoModel and transformers side by side.

    python bench/ep2_summary.py OUT_DIR        # OUT_DIR holds hf_fsdp_<L>l.txt, ep2_<L>l.txt, ep1_<L>l.txt, nemo_<L>l/*.json

Every row is a figure measured in that call; ratios are against transformers FSDP2 dp=2 of the same call (speed =
its step time / ours; memory = ours / its peak) and, for the targets, against the ep=1 one-GPU step of the same depth.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def rows_for(out: Path, layers: int) -> list[dict]:
    rows = []
    for r in _json_lines(out / f"hf_fsdp_{layers}l.txt"):
        rows.append({"system": "transformers FSDP2 dp=2", "gate": "native", "step_ms": r["step_ms"], "tps": r["tps_per_gpu"], "peak_gib": r["peak_gib"], "tflops": None})
    for r in _json_lines(out / f"ep2_{layers}l.txt") + _json_lines(out / f"ep1_{layers}l.txt"):
        if "impl" in r and "step_ms" in r:
            rows.append({"system": f"ours {r['impl'].removesuffix('+balanced')}", "gate": r["gate"], "step_ms": r["step_ms"], "tps": r["tps"],
                         "peak_gib": r["peak_gib"], "tflops": r["tflops"], "exposed_comm_ms": r.get("exposed_comm_ms")})
    for f in sorted((out / f"nemo_{layers}l").glob("*.json")):
        r = json.loads(f.read_text())
        rows.append({"system": f"NeMo AutoModel ({r['dispatcher']})", "gate": "balanced" if r["balanced"] else "native", "step_ms": r["step_ms"],
                     "tps": r["tokens_per_s_per_gpu"], "peak_gib": r.get("peak_gib_max_over_ranks", r.get("peak_gib")), "tflops": r["tflops_per_gpu"]})
    return rows


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    for layers in sorted({int(p.name.split("_")[-1].removesuffix("l.txt")) for p in out.glob("hf_fsdp_*l.txt")}):
        rows = rows_for(out, layers)
        hf = next((r for r in rows if r["system"].startswith("transformers")), None)
        print(f"\n## {layers} layers, seq 4096, batch 1 per GPU (one call)\n")
        print("| system | gate | step ms | tok/s/GPU | TFLOP/s/GPU | peak GiB | speed vs transformers | memory vs transformers | exposed comm ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            speed = f"{hf['step_ms'] / r['step_ms']:.2f}x" if hf and "world=1" not in r["system"] else ""
            mem = f"{r['peak_gib'] / hf['peak_gib']:.2f}x" if hf and r.get("peak_gib") else ""
            print(f"| {r['system']} | {r['gate']} | {r['step_ms']:.1f} | {r['tps']:,.0f} | {r['tflops'] or ''} | {r.get('peak_gib') or ''} | {speed} | {mem} | {r.get('exposed_comm_ms') or ''} |")
        ep1 = next((r for r in rows if "world=1" in r["system"] and r["gate"] == "native"), None)
        for r in rows:
            if ep1 and "world=2" in r["system"]:
                print(f"{r['system']} {r['gate']}: EP=2 step / ep=1 one-GPU step = {r['step_ms'] / ep1['step_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
