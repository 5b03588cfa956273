"""Orientation of already-fused checkpoints: the record decides, shapes confirm or refuse, nothing is guessed.

The reference is transformers 5.24 itself (a qwen3_vl_moe written by its own `save_pretrained` holds the in-memory
`[E, 2I, H]` layout, the hub files hold `[E, H, 2I]`) and the original bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from automodel_convert.convert import ConvertError, merge, split
from automodel_convert.convert.mapping import Layout
from automodel_convert.convert.registry import get_mapping

from conftest import fixture_path, folder_bytes, folder_tensors


def _transformers_saved_qwen3_vl_moe(folder: Path, hidden: int, inter: int) -> dict[str, torch.Tensor]:
    """The issue's case: a tiny qwen3_vl_moe (H=96, I=24) written by transformers' own save_pretrained."""
    import transformers

    cfg = json.loads((fixture_path("qwen3_vl_moe") / "config.json").read_text())
    cfg["text_config"].update(hidden_size=hidden, moe_intermediate_size=inter)
    cfg["vision_config"]["out_hidden_size"] = hidden
    config = transformers.Qwen3VLMoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    model = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}




def test_transformers_saved_qwen3_vl_moe_is_not_transposed(tmp_path: Path) -> None:
    truth = _transformers_saved_qwen3_vl_moe(tmp_path / "src", 96, 24)
    merge(tmp_path / "src", tmp_path / "fused")
    ours = folder_tensors(tmp_path / "fused")
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert ours[key].shape == (6, 48, 96)
    for k, v in ours.items():
        assert torch.equal(v, truth[k]), k
    split(tmp_path / "fused", tmp_path / "back")
    assert folder_bytes(tmp_path / "back") == folder_bytes(tmp_path / "src")


def test_shapes_that_fit_no_orientation_are_refused(tmp_path: Path, run_cli) -> None:
    _transformers_saved_qwen3_vl_moe(tmp_path / "src", 96, 24)
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 20  # the config no longer describes the tensors
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli("merge", tmp_path / "src", tmp_path / "dst")
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "fits neither" in err
    assert not (tmp_path / "dst").exists()


def _orient(recorded: Layout | None, shape: tuple[int, int], hidden: int = 64, inter: int = 24) -> Layout:
    m = get_mapping("qwen3_vl_moe")
    gate_up = m.groups[0]
    config = {"text_config": {"hidden_size": hidden, "moe_intermediate_size": inter}}
    return m.orient_fused(recorded, config, [(gate_up, shape, "gate_up_proj")])


def test_record_decides_only_when_the_shapes_confirm_it() -> None:
    assert _orient(None, (48, 64)) is Layout.FUSED  # transformers' own save
    assert _orient(None, (64, 48)) is Layout.TRANSPOSED  # hub files
    assert _orient(Layout.TRANSPOSED, (48, 48), hidden=48) is Layout.TRANSPOSED  # square: the record decides
    with pytest.raises(ConvertError, match="ambiguous"):
        _orient(None, (48, 48), hidden=48)
    with pytest.raises(ConvertError, match="does not fit"):
        _orient(Layout.TRANSPOSED, (48, 64))
