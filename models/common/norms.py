"""RMSNorm with transformers' exact rounding, and a fused Triton path on CUDA.

Contract: `RMSNorm(dim, eps)` holds `weight [dim]` (HF name). `forward(x [..., dim]) -> [..., dim]` in x's dtype:
normalise in fp32, then either `weight * x_hat.to(dtype)` (Llama/Qwen/DeepSeek rounding, `cast_before_weight=True`)
or `(weight * x_hat).to(dtype)` (GPT-OSS, `cast_before_weight=False`). The Triton kernel (models/common/kernels.py)
reproduces the first rounding and is used for that variant when the back-end says "triton" or "auto" and x is on
CUDA with Triton installed (the torch computation otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backend import triton_ok


def _compiling() -> bool:
    """Under torch.compile the torch computation is used: inductor fuses it into its own kernel."""
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, cast_before_weight: bool = True, impl: str = "torch") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps
        self.cast_before_weight = cast_before_weight
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ok(x, self.impl) and self.cast_before_weight and x.dtype == self.weight.dtype and not _compiling():
            from .kernels import rms_norm

            return rms_norm(x, self.weight, self.variance_epsilon)
        return rms_norm_reference(x, self.weight, self.variance_epsilon, self.cast_before_weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, cast_before_weight: bool = True) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        return weight * h.to(dtype)
    return (weight * h).to(dtype)


def make_rms_norm(dim: int, eps: float, impl: str, *, cast_before_weight: bool = True) -> nn.Module:
    """An RMSNorm for back-end `impl` ("torch" | "triton" | "te"); parameter name is always `weight`."""
    if impl == "te":
        import transformer_engine.pytorch as te  # noqa: PLC0415 - optional package, checked by BackendConfig

        return te.RMSNorm(dim, eps=eps)
    return RMSNorm(dim, eps, cast_before_weight=cast_before_weight, impl=impl)
