"""The conversion core's model types against transformers v5, the oracle, on the bundled fixtures.

For each type: split(merge(x)) reproduces x's files byte for byte; merged tensors equal transformers'
`from_pretrained(x).state_dict()`; transformers loads the merged folder with no missing/unexpected keys and gives
the same logits (float32, 1e-5); split output equals what transformers' `save_pretrained` writes.
"""

from __future__ import annotations

import json

import pytest
import torch

from automodel_convert.convert import merge, split, verify

from conftest import fixture_path, folder_bytes, folder_tensors, merged_and_split

CORE_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"]


def _load_hf(folder, **kw):
    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg["architectures"][0]
    cls = getattr(transformers, arch)
    return cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kw)




@pytest.fixture(scope="module", params=CORE_TYPES)
def converted(request, tmp_path_factory):
    return merged_and_split(request.param, tmp_path_factory)


def test_split_of_merge_is_byte_identical(converted):
    _, src, _, back = converted
    assert folder_bytes(back) == folder_bytes(src)


def test_merged_tensors_equal_transformers_state_dict(converted):
    _, src, fused, _ = converted
    model, _ = _load_hf(src)
    expected = {k: v for k, v in model.state_dict().items()}
    ours = folder_tensors(fused)
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert set(ours) == set(expected)
    for k, v in ours.items():
        assert torch.equal(v.float(), expected[k]), k
    # fused tensors really are fused: [E, 2I, H] rows [:I] = gate of expert e, [I:] = up
    raw = folder_tensors(src)
    gu = next(k for k in ours if k.endswith("experts.gate_up_proj"))
    E, two_i, _ = ours[gu].shape
    prefix = gu[: -len("gate_up_proj")]
    disk_prefix = prefix.replace(".mlp.", ".block_sparse_moe.") if any(".block_sparse_moe." in k for k in raw) else prefix
    gate = "w1" if "w1" in "".join(raw) else "gate_proj"
    last = E - 1
    assert torch.equal(ours[gu][last, : two_i // 2], raw[f"{disk_prefix}{last}.{gate}.weight"])


def test_transformers_loads_merged_without_conversion_and_same_logits(converted):
    _, src, fused, _ = converted
    ref, _ = _load_hf(src)
    model, info = _load_hf(fused)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert (a - b).abs().max().item() <= 1e-5


def test_split_equals_transformers_save_pretrained(converted, tmp_path):
    """transformers only reverts a conversion it applied at load, so the model comes from the hub-layout folder;
    its in-memory (fused) tensors are what our merge wrote (checked above), and its save_pretrained output is the
    independent reference for our split."""
    _, src, fused, back = converted
    model, _ = _load_hf(src)
    cfg = json.loads((fused / "config.json").read_text())
    dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    model.to(dtype).save_pretrained(tmp_path / "hf")
    theirs, ours = folder_tensors(tmp_path / "hf"), folder_tensors(back)
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_verify_both_layouts(converted):
    _, src, fused, _ = converted
    for folder in (src, fused):
        res = verify(folder)
        assert res.ok, res.mismatches
        assert res.bytes_compared == sum(p.stat().st_size for p in folder.glob("*.safetensors")) - sum(
            8 + int.from_bytes(p.read_bytes()[:8], "little") for p in folder.glob("*.safetensors")
        )


def test_numeric_expert_order(tmp_path):
    """qwen3_moe's fixture has >= 10 experts: expert 10 must land at index 10, not after expert 1."""
    src = fixture_path("qwen3_moe")
    merge(src, tmp_path / "f")
    raw = folder_tensors(src)
    fused = folder_tensors(tmp_path / "f")
    key = next(k for k in fused if k.endswith("layers.1.mlp.experts.down_proj"))
    assert fused[key].shape[0] >= 10
    for e in range(fused[key].shape[0]):
        assert torch.equal(fused[key][e], raw[f"model.layers.1.mlp.experts.{e}.down_proj.weight"])


def test_transposed_layout_roundtrip(tmp_path):
    src = fixture_path("qwen3_moe")
    merge(src, tmp_path / "t", layout="transposed")
    t = folder_tensors(tmp_path / "t")
    raw = folder_tensors(src)
    gu = t["model.layers.0.mlp.experts.gate_up_proj"]
    E, H, two_i = gu.shape
    for e in (0, E - 1):
        ref = torch.cat([raw[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], raw[f"model.layers.0.mlp.experts.{e}.up_proj.weight"]]).t()
        assert torch.equal(gu[e], ref)
    split(tmp_path / "t", tmp_path / "back")
    assert folder_bytes(tmp_path / "back") == folder_bytes(src)
    assert verify(tmp_path / "t").ok


def test_merge_of_fused_passes_through(tmp_path, run_cli):
    src = fixture_path("qwen3_moe")
    merge(src, tmp_path / "f")
    code, out, err = run_cli("merge", tmp_path / "f", tmp_path / "g")
    assert code == 0, err
    assert "already in the fused layout" in out
    a, b = folder_bytes(tmp_path / "f"), folder_bytes(tmp_path / "g")
    assert {k: v for k, v in a.items() if k.endswith(".safetensors")} == {k: v for k, v in b.items() if k.endswith(".safetensors")}


def test_split_restores_index_formatting_verbatim(tmp_path):
    """An index written by another tool (compact JSON, no trailing newline) comes back byte for byte."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(fixture_path("qwen3_moe"), src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (src / "model.safetensors.index.json").write_text(json.dumps(index, separators=(",", ":")))
    merge(src, tmp_path / "fused")
    split(tmp_path / "fused", tmp_path / "back")
    assert folder_bytes(tmp_path / "back") == folder_bytes(src)
