"""Shared test helpers: bundled fixtures, in-process CLI runs, hand-made safetensors files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(2)


def manifest() -> dict:
    path = FIXTURES / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    assert path.is_dir(), f"fixture {name} is missing: run `.venv/bin/python fixtures/make_fixtures.py {name}`"
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all its safetensors files), by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(p))
    return out


def merged_and_split(name: str, tmp_path_factory) -> tuple[str, Path, Path, Path]:  # noqa: ANN001
    """The bundled fixture `name`, merged (`fused/`) and split back (`split/`): (name, source, fused, split)."""
    from automodel_convert.convert import merge, split

    src = fixture_path(name)
    tmp = tmp_path_factory.mktemp(name)
    merge(src, tmp / "fused")
    split(tmp / "fused", tmp / "split")
    return name, src, tmp / "fused", tmp / "split"


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything a failed write left next to (or at) the destination."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name == name or p.name.startswith(f".{name}."))


def write_raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)


@pytest.fixture
def run_cli(capsys):
    """Run `automodel-convert ARGS` in-process: returns (exit code, stdout, stderr)."""
    from automodel_convert.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    return run
