"""Conversion you can trust (issue 15), content: a source rewritten during the run, checksums recorded by merge and
checked by verify and split, --dequantize on an unquantized source, the orientation of already-fused checkpoints.
Faults are injected deterministically by wrapping functions the engine calls (no sleeps, no races)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import trust_helpers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from trust_helpers import (
    _inject_on_first_copy,
    one_line_error,
    read_sidecar,
)

from conftest import folder_bytes, folder_tensors, leftovers

# the shared fixtures (found by name)
base, src, merged_base, merged = trust_helpers.base, trust_helpers.src, trust_helpers.merged_base, trust_helpers.merged

# ---------------------------------------------------------------- item 6: a source rewritten during the run


def test_source_rewritten_during_run_is_detected(run_cli, src, tmp_path, monkeypatch):
    shard = src / "model-00002-of-00002.safetensors"

    def rewrite():
        tensors = load_file(shard)
        save_file({k: v + 1 for k, v in tensors.items()}, shard.with_suffix(".tmp"), metadata={"format": "pt"})
        os.replace(shard.with_suffix(".tmp"), shard)

    _inject_on_first_copy(monkeypatch, rewrite)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q", "--workers", "1")
    assert code == 2
    one_line_error(err, "changed")
    assert leftovers(tmp_path, "out") == []


def test_source_rewritten_in_place_is_detected(run_cli, src, tmp_path, monkeypatch):
    shard = src / "model-00001-of-00002.safetensors"

    def rewrite_in_place():
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        with open(shard, "r+b") as f:  # same inode, same size
            f.write(data)
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    _inject_on_first_copy(monkeypatch, rewrite_in_place)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q", "--workers", "1")
    assert code == 2
    one_line_error(err, "changed")


# ---------------------------------------------------------------- item 7: checksums


def test_merge_records_checksums_of_every_source_tensor(src, merged_base):
    import hashlib

    import xxhash

    sums = read_sidecar(merged_base)["checksums"]
    assert sums["algorithm"] in ("xxh3_128", "sha256")
    reference = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():  # noqa: SIM118
                raw = f.get_tensor(k).view(torch.uint8).numpy().tobytes()
                h = xxhash.xxh3_128(raw) if sums["algorithm"] == "xxh3_128" else hashlib.sha256(raw)
                reference[k] = h.hexdigest()
    assert sums["tensors"] == reference


def _flip_bit_in_expert(folder: Path) -> None:
    shard = next(
        p for p in sorted(folder.glob("*.safetensors")) if "experts.gate_up_proj" in str(safe_open(p, "pt").keys())
    )
    with safe_open(shard, "pt") as f:
        keys = list(f.keys())
    from automodel_convert.convert.safetensors_io import read_header

    info = next(t for t in read_header(shard).tensors if t.name.endswith("experts.gate_up_proj"))
    data = bytearray(shard.read_bytes())
    data[info.start + 3] ^= 0x10
    shard.write_bytes(bytes(data))
    assert keys


def test_verify_merged_detects_flipped_bit(run_cli, merged):
    code, out, _ = run_cli("verify", merged)
    assert code == 0 and "checksum" in out
    _flip_bit_in_expert(merged)
    code, out, err = run_cli("verify", merged)
    assert code == 1, out + err
    assert "MISMATCH" in out and "checksum" in out


def test_split_checks_output_against_checksums(run_cli, merged, tmp_path):
    _flip_bit_in_expert(merged)
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "checksum")
    assert leftovers(tmp_path, "out") == []


def test_split_of_intact_merge_is_byte_identical(run_cli, src, merged, tmp_path):
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 0, err
    assert folder_bytes(tmp_path / "out") == folder_bytes(src)


# ---------------------------------------------------------------- item 8: --dequantize on an unquantized source


def test_dequantize_unquantized_is_refused(run_cli, src, tmp_path):
    code, _, err = run_cli("merge", src, tmp_path / "out", "--dequantize", "bf16", "-q")
    assert code == 2
    one_line_error(err, "not quantized")
    assert leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------- item 1: orientation of already-fused checkpoints


def _vl_checkpoint(
    folder: Path, *, hidden: int, inter: int, transposed: bool, experts: int = 3
) -> dict[str, torch.Tensor]:
    """A minimal qwen3_vl_moe checkpoint: returns the fused tensors in transformers' in-memory layout."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    model = {}
    disk = {}
    for layer in range(2):
        p = f"model.language_model.layers.{layer}.mlp.experts"
        gate_up = torch.randn(experts, 2 * inter, hidden, generator=g).bfloat16()
        down = torch.randn(experts, hidden, inter, generator=g).bfloat16()
        model[f"{p}.gate_up_proj"], model[f"{p}.down_proj"] = gate_up, down
        disk[f"{p}.gate_up_proj"] = gate_up.transpose(1, 2).contiguous() if transposed else gate_up
        disk[f"{p}.down_proj"] = down.transpose(1, 2).contiguous() if transposed else down
    disk["model.language_model.embed_tokens.weight"] = torch.randn(8, hidden, generator=g).bfloat16()
    save_file(disk, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = {
        "model_type": "qwen3_vl_moe",
        "text_config": {"hidden_size": hidden, "moe_intermediate_size": inter, "num_experts": experts},
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return model


def assert_bits_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every tensor of `want` is in `got` with the same bits (bf16 compared as int16)."""
    for k, v in want.items():
        assert torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k


@pytest.mark.parametrize("transposed", [False, True], ids=["saved-by-transformers", "hub-transposed"])
def test_fused_orientation_detected_from_shapes(run_cli, tmp_path, transposed):
    model = _vl_checkpoint(tmp_path / "src", hidden=40, inter=12, transposed=transposed)
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q")
    assert code == 0, err
    assert_bits_equal(folder_tensors(tmp_path / "out"), model)
    code, _, err = run_cli("split", tmp_path / "out", tmp_path / "back", "-q")
    assert code == 0, err
    assert folder_bytes(tmp_path / "back")["model.safetensors"] == folder_bytes(tmp_path / "src")["model.safetensors"]
    from automodel_convert.convert import inspect

    info = inspect(tmp_path / "src")
    assert info["layout"] == ("transposed" if transposed else "fused")
    assert {g["fused"].rsplit(".", 1)[-1]: g["part_shapes"][0] for g in info["groups"]} == {
        "gate_up_proj": [12, 40],
        "down_proj": [40, 12],
    }


@pytest.mark.parametrize("transposed", [True, False], ids=["hub", "transformers"])
def test_square_gate_up_is_decided_by_down(run_cli, tmp_path, transposed):
    """2I == H: gate_up [2I, H] is square, but down [H, I] vs [I, H] is not, so the checkpoint as a whole fits one
    orientation (a tensor alone that fits both is refused: tests/test_orientation.py). --source-layout naming the
    other orientation is refused in one line."""
    model = _vl_checkpoint(tmp_path / "src", hidden=24, inter=12, transposed=transposed)
    wrong = "fused" if transposed else "transposed"
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q", "--source-layout", wrong)
    assert code == 2
    one_line_error(err, "does not fit")
    assert leftovers(tmp_path, "out") == []
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q")
    assert code == 0, err
    assert_bits_equal(folder_tensors(tmp_path / "out"), model)


@pytest.mark.parametrize("transposed", [True, False], ids=["hub", "transformers"])
def test_square_down_projection_is_decided_by_gate_up(run_cli, tmp_path, transposed):
    """I == H: the down projection [H, I] is square, but gate_up [2I, H] vs [H, 2I] is not: no flag needed."""
    model = _vl_checkpoint(tmp_path / "src", hidden=16, inter=16, transposed=transposed)
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q")
    assert code == 0, err
    assert_bits_equal(folder_tensors(tmp_path / "out"), model)


def test_source_layout_that_does_not_fit_is_refused(run_cli, tmp_path):
    _vl_checkpoint(tmp_path / "src", hidden=40, inter=12, transposed=True)
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q", "--source-layout", "fused")
    assert code == 2
    one_line_error(err, "fused")
