"""Conversion you can trust (issue 15), crashes and leftovers: every failure is one line on stderr, exit 2, nothing
left behind; output permissions; fsync before the rename; headers refused like the safetensors library refuses
them. Faults are injected by wrapping functions the engine calls; real signals are sent by the process to itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trust_helpers
from safetensors import safe_open
from safetensors.torch import load_file
from trust_helpers import (
    one_line_error,
)

from conftest import leftovers, write_raw_safetensors

# the shared fixtures (found by name)
base, src, merged_base, merged = trust_helpers.base, trust_helpers.src, trust_helpers.merged_base, trust_helpers.merged

# ---------------------------------------------------------------- crashes and leftovers


def test_failing_extra_file_copy_is_one_line(run_cli, src, tmp_path, monkeypatch):
    import errno

    import automodel_convert.convert.staging as staging

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging, "copy_extra_file", full)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "no space")
    assert leftovers(tmp_path, "out") == []


def test_unreadable_extra_file_is_a_source_problem(run_cli, src, tmp_path, monkeypatch):
    import errno

    import automodel_convert.convert.staging as staging

    real = staging.copy_extra_file

    def unreadable(s, d):
        if Path(s).name == "tokenizer.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(s))
        return real(s, d)

    monkeypatch.setattr(staging, "copy_extra_file", unreadable)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "tokenizer.json", "source")
    assert leftovers(tmp_path, "out") == []


def test_huge_num_experts_is_bounded_by_tensors(run_cli, src, tmp_path):
    import resource

    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts"] = 10**9
    (src / "config.json").write_text(json.dumps(cfg))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "num_experts")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no 10^9-long lists


def test_lone_surrogate_tensor_name_is_refused(run_cli, src, tmp_path):
    for p in src.glob("*.safetensors"):
        p.unlink()
    (src / "model.safetensors.index.json").unlink()
    raw = b'{"a\\udc80":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    raw += b" " * (-len(raw) % 8)
    (src / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0")
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "UTF-8")


@pytest.mark.parametrize("size", ["1e400GB", "nan", "inf", "-0", "1e-30B"])
def test_absurd_max_shard_size(run_cli, src, tmp_path, size):
    code, _, err = run_cli("merge", src, tmp_path / "out", "--max-shard-size", size, "-q")
    assert code == 2
    one_line_error(err, "--max-shard-size")


def test_usage_error_is_one_line(run_cli, src, tmp_path):
    code, _, err = run_cli("merge", src, tmp_path / "out", "--no-such-flag")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--no-such-flag" in lines[0], err


def test_ctrl_c_during_imports_is_one_line():
    code = (
        "import builtins, sys\nreal = builtins.__import__\n"
        "def imp(name, *a, **k):\n    if name == 'typer':\n        raise KeyboardInterrupt\n    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\nfrom automodel_convert.cli import console_main\nconsole_main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130
    assert len(proc.stderr.strip().splitlines()) == 1 and "interrupted" in proc.stderr, proc.stderr


def test_long_destination_name(run_cli, src, tmp_path):
    dst = tmp_path / ("d" * 240)
    code, _, err = run_cli("merge", src, dst, "-q")
    assert code == 0, err
    assert (dst / "automodel_convert.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", dst.name])


def test_output_keeps_source_permissions(run_cli, src, tmp_path):
    for p in src.iterdir():
        p.chmod(0o640)
    src.chmod(0o750)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 0, err
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o640 for p in out.iterdir()}


def test_source_read_error_is_reported_as_source_problem(run_cli, src, tmp_path, monkeypatch):
    import errno

    import automodel_convert.convert.sources as sources

    def eio(fd, view, off):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sources, "_source_preadv", eio)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "source")
    assert "destination" not in err
    assert leftovers(tmp_path, "out") == []


def test_output_is_fsynced_before_rename(src, tmp_path, monkeypatch):
    import automodel_convert.convert.destination as d
    import automodel_convert.convert.engine as engine
    from automodel_convert.convert import merge

    events: list[str] = []
    real_fsync, real_rename = os.fsync, d.commit_rename
    monkeypatch.setattr(engine.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(d, "commit_rename", lambda *a: (events.append("rename"), real_rename(*a))[1])
    merge(src, tmp_path / "out")
    n_files = len(list((tmp_path / "out").iterdir()))
    assert events.index("rename") >= n_files and set(events[: events.index("rename")]) == {"fsync"}


@pytest.mark.parametrize(
    "entry,why",
    [
        ({"dtype": "U8", "shape": ["4"], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "U8", "shape": [4], "data_offsets": ["0", "4"]}, "offsets"),
        ({"dtype": "U8", "shape": [True, 4], "data_offsets": [0, 4]}, "shape"),
    ],
)
def test_malformed_header_values_refused_like_safetensors(run_cli, src, tmp_path, entry, why):
    shard = src / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    shard.unlink()
    (src / "model.safetensors.index.json").unlink()
    write_raw_safetensors(src / "bad.safetensors", {"bad": entry}, b"\0" * 4)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the reference refuses it, whatever its exception type
        safe_open(src / "bad.safetensors", "pt").get_tensor("bad")
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2 and tensors
    one_line_error(err, why)


def test_trailing_junk_refused_like_safetensors(run_cli, src, tmp_path):
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes() + b"junk-junk")
    with pytest.raises(Exception):  # noqa: B017, PT011
        safe_open(shard, "pt")
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "trailing")
