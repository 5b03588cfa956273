"""The table of registered model types (`automodel-convert list`, docs/MODELS.md).

Contract: one row per registered model type (aliases included, marked): family, hub (on-disk) expert layout, fused
layout (what transformers v5 holds), config fields used, and verification status. A type is `verified` only when
its own fixture exists (`fixtures/<model_type>/` listed in `fixtures/manifest.json`): tests/test_families.py runs the
bit-exact and transformers checks on exactly those fixtures, and tests/test_registry.py fails when a registered
type has none. Quantized fixtures of a type (`deepseek_v3_fp8`, `gpt_oss_mxfp4`, tested by tests/test_quant.py)
are named in its status. Everything here is derived from the mapping data; nothing is typed twice.

`python -m automodel_convert.convert.catalog --write docs/MODELS.md` regenerates the table in the docs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .mapping import ExpertGroup, Layout, MoEMapping
from .ops import Chain
from .registry import registry

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "MODELS.md"
BEGIN, END = "<!-- catalog:begin -->", "<!-- catalog:end -->"
COLUMNS = ("model type", "family", "on-disk experts", "fused (model)", "config fields", "status")

# symbolic sizes: distinct small numbers that the shapes of a bound chain map back to names
_I, _H = 3, 5
_SYMBOLS = {_I: "I", 2 * _I: "2I", 3 * _I: "3I", _H: "H"}


def fixtures() -> dict[str, dict]:
    """Fixture name -> manifest entry, for fixtures that exist on disk."""
    manifest = FIXTURES / "manifest.json"
    if not manifest.exists():
        return {}
    data = json.loads(manifest.read_text())
    return {k: v for k, v in data.items() if not v.get("error") and (FIXTURES / k / "config.json").exists()}


def verified_types() -> set[str]:
    """Types with their own fixture (name == model_type): the ones tests/test_families.py checks."""
    return {k for k, v in fixtures().items() if v.get("model_type") == k}


def _symbolic(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(["E", *(_SYMBOLS.get(n, str(n)) for n in shape)]) + "]"


def _is_down(g: ExpertGroup) -> bool:
    return bool(re.search(r"down|\bw2\b|output", g.fused + " ".join(g.parts)))


def _part_shapes(g: ExpertGroup) -> list[tuple[int, int]]:
    return [(_H, _I) if _is_down(g) else (_I, _H)] * len(g.parts)


def _strip(key: str) -> str:
    """`backbone.layers.7.mixer.experts.9.up_proj.weight` -> `mixer.experts.{e}.up_proj.weight`."""
    key = re.sub(r"^.*?\b(layers|blocks)\.7\.", "", key)
    return key.replace(".9.", ".{e}.")


def _join(names: list[str]) -> str:
    """`a.{e}.x.weight`, `a.{e}.y.weight` -> `a.{e}.{x,y}.weight`."""
    if len(names) == 1:
        return names[0]
    pre = names[0]
    for n in names[1:]:
        while not n.startswith(pre):
            pre = pre[: pre.rstrip(".").rfind(".") + 1] if "." in pre.rstrip(".") else ""
    post = names[0][len(pre) :]
    for n in names[1:]:
        while not n.endswith(post):
            post = post[post.find(".", 1) :] if "." in post[1:] else ""
    mids = [n[len(pre) : len(n) - len(post)] for n in names]
    return f"{pre}{{{','.join(mids)}}}{post}"


def _disk(m: MoEMapping, name: str) -> str:
    prefix = m.extra.get("prefix", "model.")
    return _strip(m.to_disk_key(name.format(prefix=prefix, layer=7, expert=9)))


def _model(m: MoEMapping, name: str) -> str:
    return _strip(name.format(prefix=m.extra.get("prefix", "model."), layer=7, expert=9))


def _prefix(m: MoEMapping, naming: str) -> str:
    """Where the layers live when it is not plain `model.` (multimodal and wrapper types)."""
    key = "{prefix}layers.{layer}.x".format(prefix=m.extra.get("prefix", "model."), layer=7)
    if naming == "disk":
        key = m.to_disk_key(key)
    pre = key[: key.find("layers.7.")]
    also = m.extra.get("also")
    if also:  # a second stack of experts (qwen3_omni_moe's talker)
        return f" (under {pre} and {also})"
    return "" if pre == "model." else f" (under {pre})"


def _layout_text(m: MoEMapping, layout: Layout, naming: str) -> str:
    stacked = [g for g in m.groups if g.stacked]
    name = _disk if naming == "disk" else _model
    if layout is Layout.PER_EXPERT:
        parts = [name(m, p) for g in stacked for p in g.parts]
        # one pattern for all parts of all groups: gate|up|down side by side
        text = "per-expert " + _join(parts)
    else:
        items = []
        for g in stacked:
            shape = Chain.bind(g.ops_for(layout), _part_shapes(g)).out_shapes(_part_shapes(g))[0]
            items.append(f"{name(m, g.fused)} {_symbolic(shape)}")
        text = ", ".join(items)
    for g in m.groups:
        if not g.stacked:  # a non-expert fusion: parts on disk, one tensor in the model
            text += f"; {_join([name(m, p) for p in g.parts])}" if naming == "disk" else f"; {name(m, g.fused)} (dim-0 cat)"
    return text + _prefix(m, naming)


def _config_fields(m: MoEMapping) -> str:
    if not m.num_experts_fields and not m.intermediate_fields:
        return str(m.extra.get("config", "-")) + " (E from the keys)"
    pre = f"{m.text_config_field}." if m.text_config_field else ""
    e = " or ".join(pre + f for f in m.num_experts_fields) or "-"
    i = " or ".join(pre + f for f in m.intermediate_fields) or "-"
    return f"E: {e}; I: {i}"


def catalog_rows() -> list[dict]:
    fx = fixtures()
    verified = verified_types()
    rows = []
    for name, m in registry().items():
        if not m.groups:
            disk, fused = "as the model (disk equals model)", str(m.extra.get("fused", "unchanged"))
        else:
            disk = _layout_text(m, m.disk_layout, "disk")
            if m.disk_layout is not Layout.PER_EXPERT:
                disk = f"{m.disk_layout}: {disk}"
            fused = _layout_text(m, Layout.FUSED, "model")
        if name != m.model_type:
            status = f"alias of {m.model_type}"
        elif name in verified:
            quant = sorted(v.get("quantization") for k, v in fx.items() if k != name and v.get("model_type") == name and v.get("quantization"))
            status = "verified" + (f" (+{', +'.join(quant)})" if quant else "")
        else:
            status = "unverified (no fixture)"
        rows.append(
            {
                "model_type": name,
                "family": m.family,
                "disk_layout": disk,
                "fused_layout": fused,
                "config_fields": _config_fields(m),
                "verified": status,
            }
        )
    return rows


def render_table(rows: list[dict]):
    from rich.table import Table

    n_ok = sum(r["verified"].startswith("verified") for r in rows)
    t = Table(title=f"{len(rows)} registered model types ({n_ok} verified)")
    for c in COLUMNS:
        t.add_column(c, overflow="fold", no_wrap=c in ("model type", "family", "status"))
    for r in rows:
        t.add_row(r["model_type"], r["family"], r["disk_layout"], r["fused_layout"], r["config_fields"], r["verified"])
    return t


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (r["model_type"], r["family"], r["disk_layout"], r["fused_layout"], r["config_fields"], r["verified"])
        lines.append("| " + " | ".join(f"`{c}`" if i in (2, 3) else c for i, c in enumerate(cells)) + " |")
    return "\n".join(lines) + "\n"


def docs_table(text: str) -> str:
    """The generated block of docs/MODELS.md (between the catalog markers)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"{DOCS} has no {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_docs(path: Path = DOCS) -> None:
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{markdown_table(catalog_rows())}{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_docs(Path(sys.argv[2]) if len(sys.argv) > 2 else DOCS)
    else:
        sys.stdout.write(markdown_table(catalog_rows()))
