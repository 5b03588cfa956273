"""Conversion you can trust (issue 15), destinations: a sidecar that lies, a destination that contains the source or
appears mid-run, crash-safe --overwrite. The rest: `test_convert_trust_content.py` (sources that change, checksums,
--dequantize, orientation) and `test_convert_trust_errors.py` (crashes and leftovers).

Each test reproduces one finding of the issue against an independent reference: the original bytes, the
`safetensors` library, or `torch` itself. Faults are injected deterministically by wrapping functions the engine
calls (no sleeps, no races); real signals are sent by the process to itself from such a wrapper.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import trust_helpers
from safetensors.torch import load_file
from trust_helpers import (
    H,
    I,
    _inject_on_first_copy,
    _write_sidecar,
    one_line_error,
    read_sidecar,
    run_cli_subprocess,
)

from conftest import folder_bytes, folder_tensors, leftovers

# the shared fixtures (found by name)
base, src, merged_base, merged = trust_helpers.base, trust_helpers.src, trust_helpers.merged_base, trust_helpers.merged

# ---------------------------------------------------------------- item 2: split trusts the sidecar


@pytest.mark.parametrize(
    "name", ["../escape.safetensors", "/ABS/victim.txt", "sub/x.safetensors", "config.json", ".hidden.safetensors"]
)
def test_split_refuses_sidecar_shard_names_outside_destination(run_cli, merged, tmp_path, name):
    victim = tmp_path / "victim" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    name = name.replace("/ABS/", str(victim.parent) + "/")
    sidecar = read_sidecar(merged)
    sidecar["original"]["files"][0]["name"] = name
    _write_sidecar(merged, sidecar)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "automodel_convert.json")
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "escape.safetensors").exists()


def test_split_refuses_duplicate_sidecar_shard_names(run_cli, merged, tmp_path):
    sidecar = read_sidecar(merged)
    files = sidecar["original"]["files"]
    files[1]["name"] = files[0]["name"]
    _write_sidecar(merged, sidecar)
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "twice")
    assert leftovers(tmp_path, "out") == []


def test_split_refuses_hand_edited_parts(run_cli, merged, tmp_path):
    sidecar = read_sidecar(merged)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert sidecar["parts"][key] == [[I, H], [I, H]]
    sidecar["parts"][key] = [[I // 2, H * 2], [I, H]]  # same byte count, wrong shapes
    _write_sidecar(merged, sidecar)
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "parts")
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize(
    "field,value", [("layout", "sideways"), ("original_layout", 7), ("original", [1]), ("parts", {"x": "y"})]
)
def test_split_refuses_malformed_sidecar_fields(run_cli, merged, tmp_path, field, value):
    sidecar = read_sidecar(merged)
    sidecar[field] = value
    _write_sidecar(merged, sidecar)
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err)
    assert leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------- item 3: destination that contains the source


def test_overwrite_onto_ancestor_of_source_refused(run_cli, base, tmp_path):
    parent = tmp_path / "a" / "p"
    shutil.copytree(base, parent / "src")
    (parent / "notes.txt").write_text("mine")
    before = folder_bytes(parent / "src")
    code, _, err = run_cli("merge", parent / "src", parent, "--overwrite", "-q")
    assert code == 2
    one_line_error(err, "contains the source")
    assert folder_bytes(parent / "src") == before and (parent / "notes.txt").read_text() == "mine"
    code, _, err = run_cli("merge", parent / "src", parent, "--overwrite", "--force", "-q")
    assert code == 2  # --force never allows it
    assert folder_bytes(parent / "src") == before


def test_overwrite_replaces_only_checkpoint_folders(run_cli, src, merged, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli("merge", src, other, "--overwrite", "-q")
    assert code == 2
    one_line_error(err, "--force")
    assert sorted(os.listdir(other)) == ["notes.txt"]
    code, _, err = run_cli("merge", src, other, "--overwrite", "--force", "-q")
    assert code == 0, err
    assert not (other / "notes.txt").exists() and (other / "automodel_convert.json").exists()
    # a checkpoint folder (written by us) is replaced with --overwrite alone, but not with a stranger's file in it
    (merged / "notes.txt").write_text("mine")
    code, _, err = run_cli("merge", src, merged, "--overwrite", "-q")
    assert code == 2 and "--force" in err and (merged / "notes.txt").exists()
    (merged / "notes.txt").unlink()
    code, _, err = run_cli("merge", src, merged, "--overwrite", "-q")
    assert code == 0, err
    assert leftovers(tmp_path, "merged") == ["merged"] and leftovers(tmp_path, "other") == ["other"]


def test_destination_dot_with_overwrite(run_cli, src, tmp_path, monkeypatch):
    monkeypatch.chdir(src)
    code, _, err = run_cli("merge", src, ".", "--overwrite", "-q")
    assert code == 2
    one_line_error(err)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli("merge", src, ".", "--overwrite", "-q")
    assert code == 2
    one_line_error(err, "current folder")


# ---------------------------------------------------------------- item 4: a destination that appears mid-run


def test_destination_created_during_run_is_kept(run_cli, src, tmp_path, monkeypatch):
    dst = tmp_path / "out"

    def someone_else_writes():
        dst.mkdir()
        (dst / "notes.txt").write_text("theirs")

    _inject_on_first_copy(monkeypatch, someone_else_writes)
    code, _, err = run_cli("merge", src, dst, "-q", "--workers", "1")
    assert code == 2
    one_line_error(err, "appeared")
    assert sorted(os.listdir(dst)) == ["notes.txt"] and (dst / "notes.txt").read_text() == "theirs"
    assert leftovers(tmp_path, "out") == ["out"]


def test_second_writer_to_same_destination_is_refused(src, merged_base, tmp_path, monkeypatch):
    from automodel_convert.convert import ConvertError, merge

    dst = tmp_path / "out"
    errors: list[str] = []

    def second_merge():
        try:
            merge(src, dst, overwrite=True, workers=1)
        except ConvertError as e:
            errors.append(str(e))

    _inject_on_first_copy(monkeypatch, second_merge)
    merge(src, dst, workers=1)
    assert len(errors) == 1 and "another" in errors[0], errors
    assert folder_bytes(dst) == folder_bytes(merged_base)
    assert leftovers(tmp_path, "out") == ["out"]


# ---------------------------------------------------------------- item 5: crash-safe --overwrite


_SIGTERM_AT_COMMIT = """
import os, signal
import automodel_convert.convert.destination as d
real = d.{fn}
def hooked(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
d.{fn} = hooked
{extra}
"""


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_sigterm_during_overwrite_commit(merged, src, tmp_path, mode):
    """SIGTERM arrives inside the final step: the destination is then the complete new checkpoint, no `.old-*` or
    partial folder is left, and the message says so (it never claims nothing was written)."""
    (src / "generation_config.json").write_text('{"new": true}')  # so that the new output differs from the old
    prelude = _SIGTERM_AT_COMMIT.format(fn="commit_rename", extra="d._renameat2 = None" if mode == "fallback" else "")
    proc = run_cli_subprocess(["merge", src, merged, "--overwrite", "-q"], prelude)
    assert proc.returncode == 130, proc.stderr
    assert "complete" in proc.stderr and "nothing was written" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (merged / "generation_config.json").read_text() == '{"new": true}'
    assert {k: v.view(torch.int16) for k, v in folder_tensors(merged).items()}.keys() == set(folder_tensors(merged))
    assert read_sidecar(merged)["checksums"]["tensors"].keys() == {
        k for p in src.glob("*.safetensors") for k in load_file(p)
    }
    assert leftovers(tmp_path, "merged") == ["merged"]


def test_failed_fallback_commit_restores_old_destination(merged, src, tmp_path, monkeypatch):
    """Without renameat2: if moving the new folder into place fails after the old one was moved aside, the old one
    is put back and the message says the destination is unchanged."""
    import automodel_convert.convert.destination as d
    from automodel_convert.convert import ConvertError, merge

    before = folder_bytes(merged)
    monkeypatch.setattr(d, "_renameat2", None)
    real = d.commit_rename
    calls = {"n": 0}

    def second_fails(a, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(d, "commit_rename", second_fails)
    with pytest.raises(ConvertError, match="unchanged"):
        merge(src, merged, overwrite=True)
    assert folder_bytes(merged) == before
    assert leftovers(tmp_path, "merged") == ["merged"]


def test_stale_partial_of_dead_process_is_cleaned(run_cli, src, tmp_path):
    pid = _dead_pid()
    stale = tmp_path / f".out.partial-{pid}-deadbeef"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out.partial-{os.getpid()}-cafecafe"  # a live writer's staging folder is left alone
    live.mkdir()
    code, out, err = run_cli("merge", src, tmp_path / "out")
    assert code == 0, err
    assert not stale.exists() and live.exists()
    assert "stale" in out + err
    shutil.rmtree(live)
    assert leftovers(tmp_path, "out") == ["out"]


def _dead_pid() -> int:
    return int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )


def test_old_destination_of_killed_fallback_overwrite_is_restored(run_cli, src, merged, tmp_path):
    """A fallback --overwrite killed (SIGKILL) between its two renames leaves the old checkpoint in `.merged.old-*`
    and no destination: the next run puts it back before anything else, and says so."""
    old_bytes = folder_bytes(merged)
    aside = tmp_path / f".merged.old-{_dead_pid()}-0badf00d"
    merged.rename(aside)
    code, out, err = run_cli("merge", src, merged)
    assert code == 2 and "exists" in err  # restored first, so without --overwrite it is not replaced
    assert folder_bytes(merged) == old_bytes and not aside.exists()
    merged.rename(aside)
    code, out, err = run_cli("merge", src, merged, "--overwrite")
    assert code == 0, err
    assert "restored" in out and leftovers(tmp_path, "merged") == ["merged"]


def test_signal_right_after_staging_is_made_leaves_nothing(src, tmp_path, monkeypatch):
    import automodel_convert.convert.staging as staging
    from automodel_convert.convert import merge

    real = staging._make_staging

    def made_then_interrupted(staging, dst):
        real(staging, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(staging, "_make_staging", made_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(src, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []
