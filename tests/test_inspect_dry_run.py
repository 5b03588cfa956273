"""`inspect --dry-run` on the FULL-SIZE default config of every registered type, from config.json and the index alone.

For each type transformers 5.24 builds the model on the meta device from its default config; the on-disk keys and
shapes are transformers' own save naming (`revert_weight_conversion`, what `save_pretrained` writes). The test
writes only config.json and model.safetensors.index.json (no weight file) and requires:
- `inspect --dry-run` reports no unmapped key and no problem;
- the plan built from the index plus those dtypes/shapes (`api.plan_from_index`) has exactly the meta model's
  state dict as outputs: the same names, shapes and dtypes.
The keymaps JSON (transformers 5.23, /work/shared/data) is a cross-check of the derived disk key names.

Where transformers' save naming is not the hub layout the test builds the hub keys itself and says so:
qwen3_vl_moe (the hub is transposed; transformers saves untransposed), qwen3_5_moe (the hub is fused; a model built
from a config saves per-expert: both are checked), longcat_flash (the hub has no weights for zero experts;
transformers allocates gate_up_proj for them).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from automodel_convert.convert import api
from automodel_convert.convert.mapping import Layout
from automodel_convert.convert.registry import registry

from conftest import manifest

KEYMAPS = Path(os.environ.get("KEYMAPS_JSON", "/work/shared/data/keymaps-transformers-5.23.json"))
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def _fix_lfm2_moe(c):
    c.layer_types = ["full_attention" if i % 4 == 3 else "conv" for i in range(c.num_hidden_layers)]


def _fix_dots1(c):
    c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok = 128, 2, 6  # dots.llm1's values
    c.first_k_dense_replace = 1


def _fix_hunyuan(c):
    c.head_dim, c.num_experts = c.hidden_size // c.num_attention_heads, 64


def _fix_dbrx(c):
    c.attn_config.rope_theta = 500000.0


def _fix_qwen3_omni(c):
    c.talker_config.text_config.shared_expert_intermediate_size = c.talker_config.text_config.intermediate_size
    c.talker_config.spatial_merge_size = c.thinker_config.vision_config.spatial_merge_size


# transformers 5.24's default configs of these types cannot instantiate their own model (None fields, a missing
# attribute); each fix sets only what the constructor needs
CONFIG_FIXES = {
    "lfm2_moe": _fix_lfm2_moe,  # layer_types None
    "dots1": _fix_dots1,  # n_routed_experts None
    "hunyuan_v1_moe": _fix_hunyuan,  # head_dim None (and a single expert by default)
    "dbrx": _fix_dbrx,  # DbrxAttentionConfig has no rope_theta
    "qwen3_omni_moe": _fix_qwen3_omni,  # talker configs lack shared_expert_intermediate_size, spatial_merge_size
}


def _meta_model(model_type: str):
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    if model_type in CONFIG_FIXES:
        CONFIG_FIXES[model_type](config)
    cls = getattr(transformers, manifest()[model_type]["model_class"])
    with torch.device("meta"):
        model = cls(config)
    return model, config


def _spec(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return SAFETENSORS_DTYPE[t.dtype], tuple(t.shape)


def full_size_case(model_type: str) -> tuple[dict, dict[str, tuple], list[tuple[str, dict[str, tuple]]]]:
    """(config dict, expected {model key: spec}, [(variant, {disk key: spec})]) for the default config."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model, config = _meta_model(model_type)
    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    expected = {k: _spec(v) for k, v in state.items()}
    disk = {k: _spec(v) for k, v in revert_weight_conversion(model, dict(state)).items()}
    variants = [("transformers save naming", disk)]
    mapping = registry()[model_type]
    if model_type == "qwen3_vl_moe":
        # transformers saves [E, 2I, H] / [E, H, I]; the hub (and this type's declared disk layout) is transposed
        hub = {}
        for k, (dt, s) in disk.items():
            hub[k] = (dt, (s[0], s[2], s[1])) if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else (dt, s)
        variants = [("hub layout (transposed)", hub)]
    elif model_type == "qwen3_5_moe":
        # a model built from a config saves per-expert; the hub stores the fused tensors: check both
        variants.append(("hub layout (fused)", {mapping.to_disk_key(k): v for k, v in expected.items()}))
    elif model_type == "longcat_flash":
        # transformers allocates gate_up_proj for n_routed_experts + zero_expert_num experts; the hub holds the
        # real experts only, and so does the converted model here
        E = config.n_routed_experts
        pat = re.compile(r"\.experts\.(\d+)\.")
        variants = [("hub layout (real experts)", {k: v for k, v in disk.items() if not (pat.search(k) and int(pat.search(k)[1]) >= E)})]
        for k, (dt, s) in list(expected.items()):
            if k.endswith("experts.gate_up_proj"):
                expected[k] = (dt, (E, *s[1:]))
    return config.to_dict(), expected, variants


def _write_index(folder: Path, config: dict, disk: dict[str, tuple]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, default=str))
    n = 4
    keys = list(disk)
    weight_map = {k: f"model-{1 + i * n // len(keys):05d}-of-{n:05d}.safetensors" for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


TYPES = sorted(m.model_type for m in set(registry().values()))


def _templated(key: str) -> str:
    """Every numeric path component (or the JSON's `{L}`, `{e}`, `{i}` placeholders) as `{N}`."""
    return re.sub(r"\.(\d+|\{\w+\})(?=\.|$)", ".{N}", key)


@pytest.mark.parametrize("model_type", TYPES)
def test_full_size_dry_run_and_plan(model_type, tmp_path):
    config, expected, variants = full_size_case(model_type)
    for i, (variant, disk) in enumerate(variants):
        folder = tmp_path / f"v{i}"
        _write_index(folder, config, disk)
        assert not any(folder.glob("*.safetensors"))
        info = api.inspect(folder, dry_run=True)
        assert info["complete"], (variant, info["unmapped"][:5], info["problems"][:5])
        assert info["unmapped"] == [] and info["problems"] == []
        assert info["tensors"] == len(disk)
        plan = api.plan_from_index(folder, disk)
        got = {t.name: (t.dtype, tuple(t.shape)) for t in plan.outputs}
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        assert not missing and not extra, (variant, missing[:5], extra[:5])
        bad = [k for k in got if got[k] != expected[k]]
        assert not bad, (variant, [(k, got[k], expected[k]) for k in bad[:5]])
        if any(g.stacked for g in registry()[model_type].groups):
            assert plan.instances, variant
    entry = _keymaps_entry(model_type)
    if entry is not None:  # cross-check: every expert/router key name of the keymaps JSON is among the disk keys
        ours = {_templated(k) for _, disk in variants for k in disk}
        assert not [k for k in entry["disk"] if _templated(k) not in ours]


def _keymaps_entry(model_type: str) -> dict | None:
    """The keymaps JSON's entry for this type, when it describes the same class (llama4's is the text-only LM)."""
    if not KEYMAPS.exists():
        return None
    entry = _keymaps().get(model_type)
    if not entry or not entry.get("disk") or entry.get("class") != manifest()[model_type]["model_class"]:
        return None
    return entry


_KEYMAPS_CACHE: dict = {}


def _keymaps() -> dict:
    if not _KEYMAPS_CACHE:
        _KEYMAPS_CACHE.update(json.loads(KEYMAPS.read_text()))
    return _KEYMAPS_CACHE


@pytest.mark.skipif(not KEYMAPS.exists(), reason="keymaps JSON not available")
def test_keymaps_cross_check_covers_most_types():
    assert sum(_keymaps_entry(t) is not None for t in TYPES) >= 25


def test_dry_run_cli_reports_unmapped_keys(tmp_path, run_cli):
    config, _, variants = full_size_case("qwen3_moe")
    disk = dict(variants[0][1])
    _write_index(tmp_path / "ok", config, disk)
    code, out, err = run_cli("inspect", tmp_path / "ok", "--dry-run")
    assert code == 0, err
    assert "complete" in out
    code, out, _ = run_cli("inspect", tmp_path / "ok", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["complete"]
    # an expert key no group knows, and one expert missing its up_proj
    disk["model.layers.3.mlp.experts.5.gate_norm.weight"] = ("BF16", (8,))
    del disk["model.layers.7.mlp.experts.9.up_proj.weight"]
    _write_index(tmp_path / "bad", config, disk)
    code, out, _ = run_cli("inspect", tmp_path / "bad", "--dry-run")
    assert code == 1
    assert "unmapped: model.layers.3.mlp.experts.5.gate_norm.weight" in out
    assert "model.layers.7.mlp.experts.gate_up_proj" in out and "incomplete" in out
    # the wrong model type: every expert key is reported
    code, out, _ = run_cli("inspect", tmp_path / "ok", "--dry-run", "--json", "--model-type", "mixtral")
    info = json.loads(out)
    assert code == 1 and len(info["unmapped"]) == sum(".experts." in k for k in variants[0][1])


def test_dry_run_native_and_quantized_fixture_indexes(tmp_path):
    """Real shard-less folders: the FP8 fixture's index and a native type's index map completely."""
    from conftest import fixture_path

    for name in ("deepseek_v3_fp8", "deepseek_v3"):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("config.json", "model.safetensors.index.json"):
            (folder / f).write_bytes((fixture_path(name) / f).read_bytes())
        info = api.inspect(folder, dry_run=True)
        assert info["complete"] and info["layout"] == str(Layout.PER_EXPERT), info
        assert info["groups"] and all(g["instances"] == 2 for g in info["groups"])
