"""`make demo`: merge -> split -> verify on the tiny Qwen3-MoE checkpoint bundled in fixtures/, with a summary table.

Runs in a temporary folder and checks that the split output equals the original files byte for byte.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .convert import merge, split, verify

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "qwen3_moe"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def main() -> int:
    console = Console()
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE
    with tempfile.TemporaryDirectory() as tmp:
        fused, back = Path(tmp) / "fused", Path(tmp) / "per-expert"
        t = Table(title=f"automodel-convert demo on {src.name}")
        for c in ("step", "layout", "tensors", "shards", "bytes", "time", "result"):
            t.add_column(c)
        t0 = time.perf_counter()
        m = merge(src, fused)
        t.add_row("merge", f"{m.source_layout} -> {m.target_layout}", f"{m.tensors_in} -> {m.tensors_out}", str(len(m.files_out)), f"{m.bytes_out:,}", f"{m.seconds * 1e3:.0f} ms", "ok")
        s = split(fused, back)
        same = _digest(src) == {k: v for k, v in _digest(back).items()}
        t.add_row("split", f"{s.source_layout} -> {s.target_layout}", f"{s.tensors_in} -> {s.tensors_out}", str(len(s.files_out)), f"{s.bytes_out:,}", f"{s.seconds * 1e3:.0f} ms", "files identical to the original" if same else "FILES DIFFER")
        for name, folder in (("verify original", src), ("verify fused", fused)):
            v = verify(folder)
            t.add_row(name, f"{v.source_layout} -> {v.via_layout} -> {v.source_layout}", str(v.tensors), "", f"{v.bytes_compared:,}", f"{v.seconds * 1e3:.0f} ms", "bit-exact" if v.ok else f"MISMATCH: {v.mismatches[0]}")
        console.print(t)
        console.print(f"total {time.perf_counter() - t0:.2f} s; fused tensors: {', '.join(sorted({o.name.split('.')[-1] for o in m.plan.outputs if o.fused}))}")
        return 0 if same and v.ok else 1


if __name__ == "__main__":
    sys.exit(main())
