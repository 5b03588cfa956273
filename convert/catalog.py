"""The table of registered model types (`automodel-convert list`, docs/MODELS.md).

Contract: one row per supported model type, read from its record (`registry.all_specs()`: hand-written families,
aliases marked, plus every type translated from the installed transformers): family, hub (on-disk) expert layout,
fused layout (what transformers v5 holds), config fields used, zoo class and expert-parallel support, and status.
A hand-written type is `verified` only when its own fixture exists, as recorded in the package data
`convert/verified.json` (`verified.py`; generated from `fixtures/manifest.json`, never read from the repository at
runtime): tests/test_families.py runs the bit-exact and transformers checks on exactly those fixtures, and
tests/test_registry.py fails when a registered type has none. Quantized fixtures of a type (`deepseek_v3_fp8`,
`gpt_oss_mxfp4`, tested by tests/test_quant.py) are named in its status. A translated type says `translated from
transformers X`; tests/test_transformers_coverage.py builds each from transformers' own class at test time.
`unsupported_rows()` lists the transformers types with fused experts that nothing covers, with the reason.
Everything here is derived from the records; nothing is typed twice.

`python -m automodel_convert.convert.catalog --write docs/MODELS.md` regenerates `convert/verified.json` from
`fixtures/`, then both tables in the docs: the one generator of both.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from . import verified
from .mapping import ExpertGroup, Layout, MoEMapping
from .ops import Chain
from .registry import all_mappings, all_specs
from .spec import ModelSpec

DOCS = Path(__file__).resolve().parent.parent / "docs" / "MODELS.md"
BEGIN, END = "<!-- catalog:begin -->", "<!-- catalog:end -->"
UBEGIN, UEND = "<!-- unsupported:begin -->", "<!-- unsupported:end -->"
GENERIC = "transformers"  # family of the mappings translated from transformers (`transformers_mapping.FAMILY`)
COLUMNS = ("model type", "family", "on-disk experts", "fused (model)", "config fields", "zoo model", "status")

# symbolic sizes: distinct small numbers that the shapes of a bound chain map back to names
_I, _H = 3, 5
_SYMBOLS = {_I: "I", 2 * _I: "2I", 3 * _I: "3I", _H: "H"}


def verified_types() -> set[str]:
    """Types with their own fixture (name == model_type): the ones tests/test_families.py checks."""
    return set(verified.verified())


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


def _disk(m: MoEMapping, name: str, prefix: str | None = None) -> str:
    prefix = prefix or m.extra.get("prefix", "model.")
    return _strip(m.to_disk_key(name.format(prefix=prefix, layer=7, expert=9)))


def _model(m: MoEMapping, name: str, prefix: str | None = None) -> str:
    return _strip(name.format(prefix=prefix or m.extra.get("prefix", "model."), layer=7, expert=9))


def _prefix(m: MoEMapping, naming: str) -> str:
    """Where the layers live when it is not plain `model.` (multimodal and wrapper types)."""
    prefix = str(m.extra.get("prefix", "model."))
    key = f"{prefix}x" if "layers.7." in prefix else f"{prefix}layers.7.x"  # translated types: prefix has the layer
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
        parts = list(dict.fromkeys(name(m, p) for g in stacked for p in g.parts))
        # one pattern for all parts of all groups: gate|up|down side by side
        text = "per-expert " + _join(parts) + _blocks_text(m, stacked)
    else:
        items = []
        for g in stacked:
            shape = Chain.bind(g.ops_for(layout), _part_shapes(g)).out_shapes(_part_shapes(g))[0]
            items.append(f"{name(m, g.fused)} {_symbolic(shape)}")
        text = ", ".join(items)
    texts = [text] if stacked else []
    for g in m.groups:
        if not g.stacked:  # a non-expert fusion: the parts on one side, one tensor on the other
            parts_side = (naming == "disk") != g.unfused_in_model
            pre = m.extra.get("group_prefixes", {}).get(g.fused)
            texts.append(_join([name(m, p, pre) for p in g.parts]) if parts_side else f"{name(m, g.fused, pre)} (fused)")
    return "; ".join(texts) + _prefix(m, naming)


def _blocks_text(m: MoEMapping, stacked: list[ExpertGroup]) -> str:
    """Which runs of one on-disk expert list each stack takes (`expert_block` groups), or nothing."""
    owners: dict[int, str] = {}
    for g in stacked:
        if g.expert_block is not None:
            owners.setdefault(g.expert_block, _model(m, g.fused).rsplit(".", 1)[0])

    def times_e(n: int) -> str:
        return {0: "0", 1: "E"}.get(n, f"{n}E")

    runs = [f"[{times_e(k)},{times_e(k + 1)}) {owner}" for k, owner in sorted(owners.items())]
    return f" (one list: {', '.join(runs)})" if runs else ""


def _config_fields(m: MoEMapping) -> str:
    if not m.num_experts_fields and not m.intermediate_fields:
        return str(m.extra.get("config", "-")) + " (E from the keys)"
    pre = f"{m.text_config_field}." if m.text_config_field else ""
    e = " or ".join(pre + f for f in m.num_experts_fields) or "-"
    i = " or ".join(pre + f for f in m.intermediate_fields) or "-"
    return f"E: {e}; I: {i}"


def _zoo(spec: ModelSpec) -> str:
    """The zoo class the record names and its expert-parallel support, or `-` (transformers' own class)."""
    if spec.zoo is None:
        return "-"
    cls = spec.zoo.rsplit(".", 1)[-1]
    return f"{cls} (no EP: {spec.ep_unsupported})" if spec.ep_unsupported else f"{cls} (EP)"


def _status(name: str, m: MoEMapping) -> str:
    if name != m.model_type:
        return f"alias of {m.model_type}"
    if m.family == GENERIC:
        return f"translated from transformers {m.extra.get('transformers', '?')}"
    quant = verified.verified().get(name)
    if quant is None:
        return "unverified (no fixture)"
    return "verified" + (f" (+{', +'.join(quant)})" if quant else "")


def _layouts(m: MoEMapping) -> tuple[str, str]:
    """(on-disk experts, fused (model)) texts of a mapping; tensors kept as stored are named on the model side."""
    kept = "".join(
        f"; {k.key.removeprefix('{prefix}')} kept as stored (the model holds its first {k.rows_field} rows)"
        for k in m.kept_as_stored
    )
    if not m.groups:
        return "as the model (disk equals model)", str(m.extra.get("fused", "unchanged")) + kept
    disk = _layout_text(m, m.disk_layout, "disk")
    if m.disk_layout is not Layout.PER_EXPERT:
        disk = f"{m.disk_layout}: {disk}"
    return disk, _layout_text(m, Layout.FUSED, "model") + kept


def catalog_rows() -> list[dict]:
    rows = []
    for name, spec in all_specs().items():
        m = spec.mapping
        disk, fused = _layouts(m)
        rows.append(
            {
                "model_type": name,
                "family": m.family,
                "disk_layout": disk,
                "fused_layout": fused,
                "config_fields": _config_fields(m),
                "zoo": _zoo(spec),
                "verified": _status(name, m),
            }
        )
    return rows


def unsupported_rows() -> list[dict]:
    """transformers types with fused experts that no mapping covers, with the reason (one line each)."""
    from .transformers_mapping import NO_EXPERTS, fused_expert_types, language_model_types, try_generic_mapping

    supported = all_mappings()
    rows = []
    for mt, cls in fused_expert_types().items():
        reason = try_generic_mapping(mt)[1]
        # sub-configs without a model class and towers without experts are not MoE models of their own; a language
        # model whose default config has no MoE block (gemma4) is listed: the translation is built from that config
        if mt not in supported and cls is not None and (reason != NO_EXPERTS or mt in language_model_types()):
            rows.append({"model_type": mt, "reason": reason})
    return rows


def none_unsupported() -> str:
    from importlib.metadata import version

    return f"every model type with fused experts in transformers {version('transformers')} is supported"


def title(rows: list[dict]) -> str:
    n_ok = sum(r["verified"].startswith("verified") for r in rows)
    n_gen = sum(r["verified"].startswith("translated") for r in rows)
    return f"{len(rows)} supported model types ({n_ok} verified by fixture, {n_gen} translated from transformers)"


WIDE = 150  # columns the full table needs before rich squeezes its layout columns to nothing


def render_table(rows: list[dict], width: int | None = None):
    """The supported types, then the transformers types that are not supported (with the reason). Narrower than
    `WIDE` columns (an 80-column terminal, a pipe), the layout columns are left out and the caption says where they are."""
    from rich.console import Group

    return Group(_supported_table(rows, width is not None and width < WIDE), render_unsupported(unsupported_rows()))


COMPACT = ("model type", "zoo model", "status")


def _compact(cells: dict[str, str]) -> dict[str, str]:
    """Short forms for a narrow terminal: the zoo class and its EP mark without the reason; "translated" without the version."""
    zoo = cells["zoo model"]
    if "(" in zoo:
        name, mark = zoo.split(" (", 1)
        zoo = f"{name} ({'no EP' if mark.startswith('no EP') else 'EP'})"
    return {**cells, "zoo model": zoo, "status": cells["status"].split(" from ")[0]}


def _supported_table(rows: list[dict], compact: bool = False):
    from rich.table import Table

    caption = (f"family, layouts and config fields are left out below {WIDE} columns: widen the terminal, or see "
               "`list --json` or docs/MODELS.md") if compact else None
    t = Table(title=title(rows), caption=caption)
    for c in COMPACT if compact else COLUMNS:
        t.add_column(c, overflow="fold", no_wrap=compact or c in ("model type", "family", "status"))
    for r in rows:
        cells = dict(zip(COLUMNS, _cells(r)))
        cells = _compact(cells) if compact else cells
        t.add_row(*(cells[c] for c in (COMPACT if compact else COLUMNS)))
    return t


def _cells(r: dict) -> tuple[str, ...]:
    """A row's cells in `COLUMNS` order."""
    keys = ("model_type", "family", "disk_layout", "fused_layout", "config_fields", "zoo", "verified")
    return tuple(r[k] for k in keys)


def render_unsupported(rows: list[dict]):
    from rich.table import Table
    from rich.text import Text

    if not rows:
        text = none_unsupported()
        return Text(f"{text[0].upper()}{text[1:]}.")

    t = Table(title=f"{len(rows)} transformers types with fused experts not supported")
    t.add_column("model type", no_wrap=True)
    t.add_column("reason", overflow="fold")
    for r in rows:
        t.add_row(r["model_type"], r["reason"])
    return t


def markdown_table(rows: list[dict]) -> str:
    lines = [f"{title(rows)}:", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"`{c}`" if i in (2, 3) else c for i, c in enumerate(_cells(r))) + " |")
    return "\n".join(lines) + "\n"


def docs_table(text: str) -> str:
    """The generated block of docs/MODELS.md (between the catalog markers)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"{DOCS} has no {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def markdown_unsupported(rows: list[dict]) -> str:
    if not rows:
        return f"None: {none_unsupported()}.\n"
    lines = ["| model type | why not |", "|---|---|"]
    lines += [f"| {r['model_type']} | {r['reason'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def docs_unsupported(text: str) -> str:
    """The generated block of unsupported types in docs/MODELS.md."""
    if UBEGIN not in text or UEND not in text:
        raise ValueError(f"{DOCS} has no {UBEGIN} ... {UEND} block")
    return text.split(UBEGIN, 1)[1].split(UEND, 1)[0].strip("\n") + "\n"


def _replace_block(text: str, begin: str, end: str, body: str) -> str:
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"


def write_docs(path: Path = DOCS) -> None:
    """Regenerate the shipped `verified.json` from fixtures/, then both generated blocks of docs/MODELS.md."""
    verified.write()
    text = _replace_block(path.read_text(), BEGIN, END, markdown_table(catalog_rows()))
    if UBEGIN not in text:
        text += f"\n## transformers types with fused experts that are not supported\n\n{UBEGIN}\n{UEND}\n"
    path.write_text(_replace_block(text, UBEGIN, UEND, markdown_unsupported(unsupported_rows())))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_docs(Path(sys.argv[2]) if len(sys.argv) > 2 else DOCS)
    else:
        sys.stdout.write(markdown_table(catalog_rows()))
