"""Kernel back-ends of the model zoo: which implementation runs attention, linears, RMSNorm, experts and the loss.

`BackendConfig` is a plain dataclass of strings. "auto" picks the fastest implementation available for the tensors a
layer sees, decided per call from their device and dtype (so one model object runs on CPU and, once moved, on CUDA);
`resolve(device, dtype)` returns a copy with every "auto" replaced by what the layers will pick there. Contract:

- attn: "auto" | "sdpa" | "eager" | "flash" (package flash-attn) | "te" (transformer-engine).
  auto -> "flash" on CUDA when flash-attn is importable and the dtype is half precision, else "sdpa".
- linear: "auto" | "torch" | "te". auto -> "torch".
- rms_norm: "auto" | "torch" | "triton" | "te". auto -> "triton" on CUDA when Triton is importable, else "torch".
- experts: "auto" | "grouped_mm" | "padded" | "loop". grouped_mm runs `torch._grouped_mm` over tokens sorted by expert
  (CUDA bf16, or CPU in torch >= 2.9 with 16-byte aligned strides); "padded" is a loop-free batched-bmm path over
  per-expert padded buckets (correct everywhere; one host sync per call for the bucket size); "loop" is the plain
  per-expert reference loop (debugging only). auto -> grouped_mm where supported for the device/dtype, else padded.
- dispatcher: "auto" | "local" | "alltoall" | "deepep" (package deep-ep). Consumed by the expert-parallel trainer;
  a single-process model always runs "local" (auto -> "local").
- loss: "auto" | "chunked" | "triton" | "full". "chunked" never materialises the full fp32 logits (torch, chunks of
  tokens, gradient computed chunk by chunk); "triton" is the same with a fused per-chunk cross-entropy kernel;
  "full" is transformers' computation. auto -> "triton" on CUDA with Triton, else "chunked".
- swiglu: "auto" | "torch" | "triton": the experts' elementwise kernels, i.e. SwiGLU (with the routing weight folded
  in) and the permutation's gather-and-sum. auto -> "triton" on CUDA with Triton, else "torch".
- rope: "auto" | "torch" | "triton": rotary embedding ("half" style) as one fused kernel. auto -> "triton" on CUDA
  with Triton, else "torch".
- compile: bool, torch.compile the per-layer dense parts (attention block, norms).

An option that needs a missing package raises `MissingPackageError`, a one-line message naming the package and the
install command (`pip install 'automodel-convert[te]'`); nothing silently falls back.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass

import torch

ATTN = ("auto", "sdpa", "eager", "flash", "te")
LINEAR = ("auto", "torch", "te")
RMS_NORM = ("auto", "torch", "triton", "te")
EXPERTS = ("auto", "grouped_mm", "padded", "loop")
DISPATCHER = ("auto", "local", "alltoall", "deepep")
LOSS = ("auto", "chunked", "triton", "full")
SWIGLU = ("auto", "torch", "triton")
ROPE = ("auto", "torch", "triton")

# option value -> (importable module, pip requirement to print)
_PACKAGES = {
    "te": ("transformer_engine", "pip install 'automodel-convert[te]'"),
    "deepep": ("deep_ep", "pip install 'automodel-convert[deepep]'"),
    "flash": ("flash_attn", "pip install flash-attn"),
    "triton": ("triton", "pip install triton"),
}
_PACKAGE_NAMES = {"te": "transformer-engine", "deepep": "deep-ep", "flash": "flash-attn", "triton": "triton"}


class MissingPackageError(ImportError):
    """A back-end option needs a package that is not installed (one-line message with the install command)."""


@functools.cache
def has_package(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(option: str, field: str) -> None:
    """Raise `MissingPackageError` when `option` of `field` needs a package that cannot be imported."""
    module, cmd = _PACKAGES[option]
    if not has_package(module):
        raise MissingPackageError(
            f"BackendConfig({field}={option!r}) needs the package {_PACKAGE_NAMES[option]!r}, which is not installed: {cmd}"
        )


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs for this device and dtype (shape alignment is checked per call)."""
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        return (major, minor) >= (2, 9) and dtype in (torch.float32, torch.bfloat16)
    return False


def triton_ok(t: torch.Tensor, impl: str) -> bool:
    """Whether a kernel choice `impl` ("auto" | "triton" | other) runs the Triton kernel for tensor `t`."""
    return impl in ("auto", "triton") and t.is_cuda and has_package("triton")


def pick_attn(impl: str, q: torch.Tensor, plain_causal: bool) -> str:
    """Per-call attention choice: "auto" -> flash-attn for half-precision CUDA plain causal attention, else sdpa."""
    if impl != "auto":
        return impl
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and plain_causal and has_package("flash_attn"):
        return "flash"
    return "sdpa"


@dataclass(frozen=True)
class BackendConfig:
    attn: str = "auto"
    linear: str = "auto"
    rms_norm: str = "auto"
    experts: str = "auto"
    dispatcher: str = "auto"
    loss: str = "auto"
    swiglu: str = "auto"
    rope: str = "auto"
    compile: bool = False
    loss_chunk_tokens: int = 0  # tokens per cross-entropy chunk; 0 = from the vocabulary size (about 1-2 GB a chunk)
    # the experts rebuild their gathered rows and activation in backward instead of saving them (bit-identical
    # gradients, ~1/2 of the experts' saved activations; models/common/recompute.py)
    expert_recompute: bool = False

    def __post_init__(self) -> None:
        for field, allowed in (
            ("attn", ATTN),
            ("linear", LINEAR),
            ("rms_norm", RMS_NORM),
            ("experts", EXPERTS),
            ("dispatcher", DISPATCHER),
            ("loss", LOSS),
            ("swiglu", SWIGLU),
            ("rope", ROPE),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"BackendConfig({field}={value!r}): choose one of {', '.join(allowed)}")
            if value in _PACKAGES:
                require(value, field)
        if self.loss_chunk_tokens < 0:
            raise ValueError("BackendConfig(loss_chunk_tokens) must be >= 0 (0 = automatic)")

    def resolve(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BackendConfig:
        """A copy with every "auto" replaced by the fastest implementation available on `device` for `dtype`."""
        device = torch.device(device or "cpu")
        dtype = dtype or torch.float32
        cuda = device.type == "cuda"
        triton = cuda and has_package("triton")
        half = dtype in (torch.float16, torch.bfloat16)
        pick = {
            "attn": "flash" if cuda and half and has_package("flash_attn") else "sdpa",
            "linear": "torch",
            "rms_norm": "triton" if triton else "torch",
            "experts": "grouped_mm" if grouped_mm_available(device, dtype) else "padded",
            "dispatcher": "local",
            "loss": "triton" if triton else "chunked",
            "swiglu": "triton" if triton else "torch",
            "rope": "triton" if triton else "torch",
        }
        changes = {k: v for k, v in pick.items() if getattr(self, k) == "auto"}
        if self.experts == "grouped_mm" and not grouped_mm_available(device, dtype):
            raise ValueError(
                f"BackendConfig(experts='grouped_mm') is not supported on {device.type} for {dtype} in torch "
                f"{torch.__version__}: use experts='padded' or 'auto'"
            )
        return dataclasses.replace(self, **changes)

    @property
    def is_resolved(self) -> bool:
        fields = (self.attn, self.linear, self.rms_norm, self.experts, self.dispatcher, self.loss, self.swiglu, self.rope)
        return "auto" not in fields


def as_backend(backend: BackendConfig | dict | str | None) -> BackendConfig:
    """Accept a BackendConfig, a dict of its fields, "auto"/None (all auto) or a `key=value,...` string."""
    if backend is None or backend == "auto":
        return BackendConfig()
    if isinstance(backend, BackendConfig):
        return backend
    if isinstance(backend, dict):
        return BackendConfig(**backend)
    if isinstance(backend, str):
        fields = dict(part.split("=", 1) for part in backend.split(",") if part)
        for flag in ("compile", "expert_recompute"):
            if flag in fields:
                fields[flag] = fields[flag].lower() in ("1", "true", "yes")  # type: ignore[assignment]
        if "loss_chunk_tokens" in fields:
            fields["loss_chunk_tokens"] = int(fields["loss_chunk_tokens"])  # type: ignore[assignment]
        return BackendConfig(**fields)  # type: ignore[arg-type]
    raise TypeError(f"backend must be a BackendConfig, dict or str, not {type(backend).__name__}")
