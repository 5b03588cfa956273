"""The table of registered model types (`automodel-convert list`, docs/MODELS.md).

Contract: one row per registered model type: family, hub (on-disk) expert layout, fused layout, config fields used,
and verification status. A type is `verified` only when a fixture for it is listed in `fixtures/manifest.json`
(the registry test then runs the bit-exact and transformers checks on it); otherwise it says `unverified`.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .mapping import Layout
from .registry import registry

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _fixture_types() -> set[str]:
    manifest = FIXTURES / "manifest.json"
    if not manifest.exists():
        return set()
    data = json.loads(manifest.read_text())
    return {v.get("model_type", k) for k, v in data.items() if not v.get("error")}


def catalog_rows() -> list[dict]:
    verified = _fixture_types()
    rows = []
    for name, m in registry().items():
        if not m.groups:
            disk, fused = "fused (disk equals model)", "unchanged"
        else:
            g = m.groups[0]
            disk = "per-expert" if m.disk_layout is Layout.PER_EXPERT else str(m.disk_layout)
            fused = ", ".join(gr.fused.split(".")[-1] for gr in m.groups)
            if m.disk_layout is Layout.PER_EXPERT:
                disk += f" ({g.parts[0].split('{expert}.')[-1].split('.')[0]}...)"
        rows.append(
            {
                "model_type": name,
                "family": m.family,
                "disk_layout": disk,
                "fused_layout": fused,
                "config_fields": ", ".join((*m.num_experts_fields[:1], *m.intermediate_fields[:1])) if m.groups else "-",
                "verified": "verified" if name in verified else "unverified",
            }
        )
    return rows


def render_table(rows: list[dict]) -> Table:
    t = Table(title=f"{len(rows)} registered model types ({sum(r['verified'] == 'verified' for r in rows)} verified)")
    for c in ("model type", "family", "on-disk experts", "fused", "config fields", "status"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["model_type"], r["family"], r["disk_layout"], r["fused_layout"], r["config_fields"], r["verified"])
    return t


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model type | family | on-disk experts | fused | config fields | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model_type']} | {r['family']} | {r['disk_layout']} | {r['fused_layout']} | {r['config_fields']} | {r['verified']} |")
    return "\n".join(lines) + "\n"
