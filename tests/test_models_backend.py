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


def test_device_mesh_is_not_implemented_yet(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(NotImplementedError, match="device_mesh"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_mesh=object())
