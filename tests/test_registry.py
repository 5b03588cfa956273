"""The registry as a whole: every entry earns its `verified` status, the catalog matches docs/MODELS.md and
`automodel-convert list`, the config fields resolve, and each entry agrees with transformers 5.24's own conversion
mapping (`transformers.conversion_mapping`)."""

from __future__ import annotations

import json
import re

import pytest

from automodel_convert.convert.catalog import (
    DOCS,
    catalog_rows,
    docs_table,
    docs_unsupported,
    markdown_table,
    markdown_unsupported,
    title,
    unsupported_rows,
    verified_types,
)
from automodel_convert.convert.mapping import Layout, Template
from automodel_convert.convert.registry import all_mappings, get_mapping, registry

from conftest import FIXTURES, manifest

REQUIRED = """mixtral minimax minimax_m2 phimoe kimi_linear lfm2_moe qwen2_moe qwen3_moe qwen3_next qwen3_omni_moe qwen3_5_moe
qwen3_vl_moe deepseek_v2 deepseek_v3 deepseek_v32 glm4_moe glm4_moe_lite glm4v_moe dots1 olmoe flex_olmo hunyuan_v1_moe
ernie4_5_moe exaone_moe jamba nemotron_h granitemoe granitemoeshared granitemoehybrid gpt_oss llama4 dbrx jetmoe
longcat_flash bailing_hybrid""".split()
ENTRIES = sorted({m.model_type for m in registry().values()})


def test_required_types_are_registered():
    assert set(REQUIRED) <= set(registry()), sorted(set(REQUIRED) - set(registry()))


@pytest.mark.parametrize("model_type", ENTRIES)
def test_every_entry_has_a_fixture_that_the_checks_run_on(model_type):
    """An entry without its own fixture (or whose fixture the family tests do not run) fails CI."""
    from test_families import TYPES

    assert (FIXTURES / model_type / "config.json").exists(), (
        f"no fixture for {model_type}: fixtures/make_fixtures.py {model_type}"
    )
    assert manifest()[model_type]["model_type"] == model_type
    assert model_type in TYPES, "tests/test_families.py does not check this type"
    assert model_type in verified_types()


def test_status_is_earned():
    from test_families import TYPES
    from test_transformers_coverage import _types

    covered = {p.values[0] for p in _types()}
    rows = {r["model_type"]: r for r in catalog_rows()}
    for name, row in rows.items():
        m = all_mappings()[name]
        if m.family == "transformers":  # translated: tests/test_transformers_coverage.py builds and checks it
            assert row["verified"].startswith("translated from transformers") and name in covered, name
        elif name != m.model_type:
            assert row["verified"] == f"alias of {m.model_type}"
        elif row["verified"].startswith("verified"):
            assert name in TYPES and (FIXTURES / name / "config.json").exists()
        else:
            assert row["verified"] == "unverified (no fixture)" and name not in TYPES
    quantized = {v["model_type"] for k, v in manifest().items() if v.get("quantization") and k != v["model_type"]}
    for name in quantized & set(rows):
        assert rows[name]["verified"].startswith("verified (+")


def test_docs_table_matches_catalog():
    expected = markdown_table(catalog_rows())
    assert docs_table(DOCS.read_text()) == expected, (
        "docs/MODELS.md is stale: python -m automodel_convert.convert.catalog --write docs/MODELS.md"
    )
    unsupported = markdown_unsupported(unsupported_rows())
    assert docs_unsupported(DOCS.read_text()) == unsupported, (
        "docs/MODELS.md is stale: python -m automodel_convert.convert.catalog --write docs/MODELS.md"
    )


def test_list_command(run_cli):
    code, out, err = run_cli("list", "--json")
    assert code == 0, err
    assert json.loads(out) == catalog_rows()
    code, out, _ = run_cli("list")
    assert code == 0
    flat = re.sub(r"[│┃\s]+", " ", out)
    for name in ENTRIES:
        assert name in flat
    assert re.sub(r"\s+", " ", title(catalog_rows())) in flat
    for row in unsupported_rows():
        assert row["model_type"] in flat
    if not unsupported_rows():  # no empty table: a sentence says so
        assert "with fused experts in transformers" in flat and "is supported" in flat


@pytest.mark.parametrize("columns", [80, 120, 200])
def test_list_shows_every_column_it_prints_at_any_terminal_width(run_cli, monkeypatch, columns):
    """At 80 columns rich squeezed four of the seven columns to zero width (empty headers and cells); now a narrow
    terminal gets the columns that fit, every one of them readable, and a caption saying where the rest are."""
    from automodel_convert.convert.catalog import COLUMNS, COMPACT, WIDE

    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, _ = run_cli("list")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= columns
    flat = re.sub(r"[│┃\s]+", " ", out)
    shown = COLUMNS if columns >= WIDE else COMPACT
    for header in shown:
        assert header in flat, (columns, header)
    assert ("docs/MODELS.md" in flat) == (columns < WIDE)
    rows = catalog_rows()
    for r in rows:  # every row's zoo class and status word, whole on one line
        line = next(line for line in out.splitlines() if re.match(rf"[│┃] {re.escape(r['model_type'])} ", line))
        assert r["zoo"].split()[0] in line and r["verified"].split()[0] in line, (columns, line)


def _config_value(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


@pytest.mark.parametrize("model_type", ENTRIES)
def test_config_fields_give_the_fixture_sizes(model_type):
    """The catalog's config fields exist in the fixture's config.json and give its E and I."""
    m = get_mapping(model_type)
    info = manifest()[model_type]
    config = json.loads((FIXTURES / model_type / "config.json").read_text())
    if m.num_experts_fields:
        assert m.num_experts(config) == info["num_experts"]
    if m.intermediate_fields:
        assert m.config_value(config, m.intermediate_fields) == info["moe_intermediate_size"]
    if not m.num_experts_fields:  # E per tensor from the keys
        # qwen3_omni_moe: two expert stacks; longcat_flash: gate/up may hold E or E + zero experts
        assert model_type in ("qwen3_omni_moe", "longcat_flash")
        field = {"qwen3_omni_moe": "thinker_config.text_config.num_experts", "longcat_flash": "n_routed_experts"}[
            model_type
        ]
        assert _config_value(config, field) == info["num_experts"]


def _tf_mapping(model_type: str):
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return get_checkpoint_conversion_mapping(model_type)


def _plain(pattern: str) -> str:
    return pattern.replace("\\", "").lstrip("^")


@pytest.mark.parametrize("model_type", ENTRIES)
def test_entry_agrees_with_transformers_conversion_mapping(model_type):
    """Every expert converter of transformers' mapping has a group whose disk part keys it matches, and vice versa;
    types transformers does not convert are registered as disk equals model."""
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    m = get_mapping(model_type)
    tf = _tf_mapping(model_type)
    if model_type == "qwen3_omni_moe":  # the thinker/talker text models carry the experts' converters
        tf = _tf_mapping("qwen3_omni_moe_thinker")
    if model_type == "qwen3_5_moe":
        tf = _tf_mapping("qwen3_5_moe_text")
    converters = [
        t
        for t in tf or []
        if isinstance(t, WeightConverter) and any(isinstance(o, MergeModulelist) for o in t.operations)
    ]
    stacked = [g for g in m.groups if g.stacked]
    if not tf or model_type == "qwen3_vl_moe":
        # no transformers conversion (or only a transpose of the fused hub tensors)
        assert not converters
        assert not stacked or m.disk_layout is not Layout.PER_EXPERT
        return
    if not converters:  # granite: renames of fused tensors only
        assert m.disk_layout is Layout.FUSED and stacked
        for g in stacked:
            disk = m.to_disk_key(g.fused.format(prefix="model.", layer=3))
            assert disk != g.fused.format(prefix="model.", layer=3)  # renamed on disk
            assert any(_plain(s).rstrip(".") in disk for t in tf for s in t._original_source_patterns), disk
        return
    ours = [[m.to_disk_key(p.format(prefix="model.", layer=3, expert=0)) for p in g.parts] for g in stacked]
    for conv in converters:
        pats = [_plain(s).replace("*", "0") for s in conv._original_source_patterns]
        assert any(len(parts) == len(pats) and all(pat in key for pat, key in zip(pats, parts)) for parts in ours), (
            pats,
            ours,
        )
        # the fused target: transformers' target pattern is our group's fused key (model naming)
        target = _plain(conv._original_target_patterns[0])
        assert any(
            g.fused.endswith(target) or Template(g.fused).match("model.layers.3." + target.lstrip(".")) for g in stacked
        ), target
    assert len(converters) == len(stacked)


@pytest.mark.parametrize("model_type", sorted(t for t in ENTRIES if get_mapping(t).expert_tensors))
def test_expert_tensors_have_a_leading_expert_dim(model_type, tmp_path):
    """`expert_tensors` (what expert parallelism shards besides the fused groups) match fixture tensors whose dim 0
    is the expert dim (dbrx: expert-major rows, E * I); routers and other tensors are not matched."""
    from automodel_convert.convert import api

    m = get_mapping(model_type)
    info = manifest()[model_type]
    res = api.merge(FIXTURES / model_type, tmp_path / "m", dry_run=True)
    tpls = [Template(t) for t in m.expert_tensors]
    hits = {t.name: t.shape for t in res.plan.outputs if any(tp.match(t.name) for tp in tpls)}
    assert hits
    assert all(any(tp.match(name) for name in hits) or tp.text.endswith(("_blocks", "_scales")) for tp in tpls)
    E = info["num_experts"]
    for name, shape in hits.items():
        assert shape[0] in (E, E * info["moe_intermediate_size"]), (name, shape)
        assert "router" not in name and "gate.weight" not in name


def test_catalog_shows_each_translated_fusion_under_its_own_path():
    """transformers' patterns are unanchored, so a non-expert fusion's `{prefix}` may be another path than the
    experts' one: the rows show ernie4_5_vl_moe's routers as its hub keys (`layers.N.mlp.gate.weight_1`), and no
    row doubles a path segment (`mlp.mlp.`, as it once did)."""
    import re

    rows = {r["model_type"]: r for r in catalog_rows()}
    ernie = rows["ernie4_5_vl_moe"]
    assert "; mlp.gate.weight_1;" in ernie["disk_layout"] and "; mlp.text_moe.gate.weight (fused)" in ernie["fused_layout"], ernie
    doubled = {name: m.group(0) for name, r in rows.items() for col in ("disk_layout", "fused_layout") if (m := re.search(r"\b(\w+)\.\1\.", r[col]))}
    assert not doubled, doubled
