"""Shared by the issue-15 trust tests (`test_convert_trust*.py`): a tiny per-expert qwen3_moe checkpoint, its
merge, the CLI in a fresh interpreter, and the one-line error check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

E, H, I, LAYERS = 4, 16, 8, 2


def make_qwen3_moe(folder: Path, *, experts: int = E, hidden: int = H, inter: int = I, shards: int = 2) -> Path:
    """A tiny per-expert qwen3_moe checkpoint (hub key names), written with the safetensors library."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, hidden, generator=g).bfloat16()}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.mlp"
        tensors[f"{p}.gate.weight"] = torch.randn(experts, hidden, generator=g).bfloat16()
        for e in range(experts):
            tensors[f"{p}.experts.{e}.gate_proj.weight"] = torch.randn(inter, hidden, generator=g).bfloat16()
            tensors[f"{p}.experts.{e}.up_proj.weight"] = torch.randn(inter, hidden, generator=g).bfloat16()
            tensors[f"{p}.experts.{e}.down_proj.weight"] = torch.randn(hidden, inter, generator=g).bfloat16()
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s * per : (s + 1) * per]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "moe_intermediate_size": inter,
        "num_experts": experts,
        "num_hidden_layers": LAYERS,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder




def run_cli_subprocess(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, after `prelude` (Python code that installs a fault)."""
    code = prelude + "\nimport sys\nfrom automodel_convert.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_qwen3_moe(tmp_path_factory.mktemp("trust") / "ckpt")


@pytest.fixture
def src(base, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(base, dst)
    return dst


@pytest.fixture(scope="module")
def merged_base(base, tmp_path_factory) -> Path:
    from automodel_convert.convert import merge

    out = tmp_path_factory.mktemp("trust-merged") / "merged"
    merge(base, out)
    return out


@pytest.fixture
def merged(merged_base, tmp_path) -> Path:
    dst = tmp_path / "merged"
    shutil.copytree(merged_base, dst)
    return dst


def read_sidecar(folder: Path) -> dict:
    return json.loads((folder / "automodel_convert.json").read_text())


def _write_sidecar(folder: Path, sidecar: dict) -> None:
    (folder / "automodel_convert.json").write_text(json.dumps(sidecar))


def _inject_on_first_copy(monkeypatch, action) -> None:
    import automodel_convert.convert.engine as engine

    real = engine.copy_range
    state = {"done": False}

    def hooked(*a, **k):
        if not state["done"]:
            state["done"] = True
            action()
        return real(*a, **k)

    monkeypatch.setattr(engine, "copy_range", hooked)
