"""The package's shape: layers point down (import-linter, pyproject's contract), and the CLI starts light.

`automodel-convert --help` must not import torch (it is a conversion tool first: header-only planning needs no
torch) and answers in under 0.5 s of its own time; measured in a fresh interpreter, best of three, so that a loaded
CI machine's one slow start does not fail it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contract_is_kept() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_cli_help_imports_no_torch_and_starts_fast() -> None:
    code = "import sys, time; t = time.perf_counter(); from automodel_convert.cli import main; rc = main(['--help']);" \
           "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', time.perf_counter() - t)"
    best = None
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        wall = time.perf_counter() - start
        assert "Usage" in proc.stdout and "NOTORCH" in proc.stdout, proc.stdout[-1000:] + proc.stderr[-1000:]
        own = float(proc.stdout.strip().split()[-1])
        best = own if best is None else min(best, own)
        assert wall < 30
    assert best < 0.5, best
