"""SIGTERM at every step of `merge` and `split`, from the lock to the final rename (the CLI in a fresh interpreter).

Each case hooks one function of the write path (in every module that holds it) so that its first call sends
SIGTERM to the process and then proceeds. Whatever the step, the command ends with exit code 130 and one line, and:
- before the final rename: no destination and nothing beside it (no staging folder, no lock file);
- at the final rename: the destination is the complete new checkpoint and the message says so.
The destination never holds a partial checkpoint, and the process is never killed by the default SIGTERM action.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from trust_helpers import base, merged, merged_base, run_cli_subprocess, src  # noqa: F401 - fixtures

from conftest import folder_tensors, leftovers

_HOOK = """
import os, signal, sys
import automodel_convert.cli  # every module of the write path is imported from here on
from automodel_convert.convert import destination, engine, staging, checksums, files
real = None
for mod in (destination, engine, staging, checksums, files):
    real = real or getattr(mod, {fn!r}, None)
assert real is not None, {fn!r}
fired = []
def hooked(*a, **k):
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("automodel_convert") and getattr(mod, {fn!r}, None) is real:
        setattr(mod, {fn!r}, hooked)
"""

# the write path in order (engine.write_checkpoint inside staging.atomic_folder)
BEFORE_RENAME = [
    "clean_stale_partials",
    "check_destination",
    "staging_path",
    "copy_extra_files",
    "write_small_file",
    "copy_range",
    "fsync_fd",
    "hash_remaining_sources",
    "check_outputs",
    "fsync_dir",
]


def _run(args: list, fn: str):
    return run_cli_subprocess([*args, "-q"], _HOOK.format(fn=fn))


@pytest.mark.parametrize("fn", BEFORE_RENAME)
def test_sigterm_before_the_final_rename_leaves_nothing(src, tmp_path, fn):  # noqa: F811
    proc = _run(["merge", src, tmp_path / "out"], fn)
    assert proc.returncode == 130, (fn, proc.returncode, proc.stderr)
    assert proc.stderr.strip() == "interrupted: nothing was written (the destination is absent or unchanged)", proc.stderr
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("fn", ["copy_range", "check_outputs", "fsync_dir"])
def test_sigterm_during_split_leaves_nothing(merged, tmp_path, fn):  # noqa: F811
    proc = _run(["split", merged, tmp_path / "back"], fn)
    assert proc.returncode == 130, (fn, proc.returncode, proc.stderr)
    assert "nothing was written" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert leftovers(tmp_path, "back") == []


def test_sigterm_at_the_final_rename_leaves_the_complete_checkpoint(src, tmp_path):  # noqa: F811
    proc = _run(["merge", src, tmp_path / "out"], "commit_rename")
    assert proc.returncode == 130, proc.stderr
    assert "complete" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert leftovers(tmp_path, "out") == ["out"]
    source = {k: v for p in src.glob("*.safetensors") for k, v in load_file(p).items()}
    merged_out = folder_tensors(tmp_path / "out")
    assert sum(t.numel() for t in merged_out.values()) == sum(t.numel() for t in source.values())
    assert all(t.dtype == torch.bfloat16 for t in merged_out.values())
