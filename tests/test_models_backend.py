"""BackendConfig: validation, "auto" resolution, one-line errors for options whose package is missing."""

from __future__ import annotations

import pytest
import torch

from automodel_convert.models import AutoModelForCausalLM, BackendConfig, MissingPackageError
from automodel_convert.models import backend as backend_mod
from automodel_convert.models.backend import as_backend


@pytest.fixture
def nothing_installed(monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.setattr(backend_mod, "has_package", lambda module: False)


@pytest.mark.parametrize(
    ("kwargs", "package", "install"),
    [
        (dict(attn="te"), "transformer-engine", "pip install 'automodel-convert[te]'"),
        (dict(linear="te"), "transformer-engine", "pip install 'automodel-convert[te]'"),
        (dict(rms_norm="te"), "transformer-engine", "pip install 'automodel-convert[te]'"),
        (dict(dispatcher="deepep"), "deep-ep", "pip install 'automodel-convert[deepep]'"),
        (dict(attn="flash"), "flash-attn", "pip install flash-attn"),
        (dict(rms_norm="triton"), "triton", "pip install triton"),
        (dict(loss="triton"), "triton", "pip install triton"),
    ],
)
def test_missing_package_is_a_one_line_error(nothing_installed, kwargs: dict, package: str, install: str) -> None:  # noqa: ANN001
    with pytest.raises(MissingPackageError) as info:
        BackendConfig(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert repr(package) in message and install in message
    assert isinstance(info.value, ImportError)


def test_invalid_values_and_dispatcher() -> None:
    with pytest.raises(ValueError, match="experts='cutlass'"):
        BackendConfig(experts="cutlass")
    assert BackendConfig(dispatcher="alltoall").dispatcher == "alltoall"
    assert BackendConfig().resolve("cpu").dispatcher == "local"
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        BackendConfig(loss_chunk_tokens=-1)


def test_auto_resolution_on_cpu(nothing_installed) -> None:  # noqa: ANN001
    r = BackendConfig().resolve("cpu", torch.float32)
    assert (r.attn, r.linear, r.rms_norm, r.loss, r.swiglu, r.dispatcher) == ("sdpa", "torch", "torch", "chunked", "torch", "local")
    assert r.experts in ("grouped_mm", "padded")
    assert r.is_resolved and not BackendConfig().is_resolved
    explicit = BackendConfig(attn="eager", experts="padded").resolve("cpu")
    assert (explicit.attn, explicit.experts) == ("eager", "padded")


def test_as_backend_forms() -> None:
    assert as_backend(None) == BackendConfig()
    assert as_backend({"attn": "eager"}).attn == "eager"
    parsed = as_backend("attn=eager,experts=padded,compile=true,loss_chunk_tokens=64")
    assert (parsed.attn, parsed.experts, parsed.compile, parsed.loss_chunk_tokens) == ("eager", "padded", True, 64)


def test_device_mesh_must_be_a_parallel_mesh() -> None:
    from conftest import fixture_path

    with pytest.raises(TypeError, match="device_mesh must be a parallel.ParallelMesh"):
        AutoModelForCausalLM.from_pretrained(fixture_path("qwen3_moe"), device_mesh=object())


def test_sharded_from_pretrained_equals_plain_load() -> None:
    """One rank, ep=1: the device_mesh path (parallel.load_sharded) gives the same tensors as the plain path."""
    import torch.distributed as dist

    from automodel_convert.parallel import build_mesh

    from conftest import fixture_path

    src = fixture_path("deepseek_v3")
    plain = AutoModelForCausalLM.from_pretrained(src).state_dict()
    try:
        mesh = build_mesh(ep=1, device_type="cpu")
        sharded = AutoModelForCausalLM.from_pretrained(src, device_mesh=mesh).state_dict()
    finally:
        dist.destroy_process_group()
    assert set(plain) == set(sharded)
    for k, v in plain.items():
        assert sharded[k].dtype == v.dtype and torch.equal(sharded[k], v), k
