"""The package's shape: layers point down (import-linter, pyproject's contract), and the CLI starts light.

`automodel-convert --help` must not import torch (it is a conversion tool first: header-only planning needs no
torch) and answers in under 0.5 s of its own time; measured in a fresh interpreter, best of three, so that a loaded
CI machine's one slow start does not fail it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contract_is_kept() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_cli_help_imports_no_torch() -> None:
    """`--help` must not pay for importing torch. How fast the CLI starts is measured by `bench/cli_start.py`,
    not asserted here: a timed test fails on a busy machine without a bug."""
    code = "import sys; from automodel_convert.cli import main; main(['--help']); print('TORCH' if 'torch' in sys.modules else 'NOTORCH')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Usage" in proc.stdout and proc.stdout.strip().endswith("NOTORCH"), proc.stdout[-1000:] + proc.stderr[-1000:]
