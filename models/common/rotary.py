"""Rotary position embedding: frequencies from the HF config, three ways of rotating q and k.

Contract: `RotaryEmbedding(config, head_dim, style)` -> `forward(x, position_ids [B, S]) -> (cos, sin)` each
`[B, S, R]` in x's dtype. `style="half"` (Llama/Qwen/GLM, and DeepSeek's interleaved variant): R = rotary dim,
frequencies repeated twice; `style="gpt_oss"`: R = rotary dim / 2, frequencies once.
Frequencies: "default" rope type from `rope_theta` and `partial_rotary_factor` (rotary dim = head_dim * factor);
other static types (yarn, linear, llama3, ...) through transformers' `ROPE_INIT_FUNCTIONS`, whose attention scaling
multiplies cos and sin like transformers does. Rope types that change with the sequence length ("dynamic",
"longrope") are not supported (NotImplementedError).
`apply_rotary(q, k, cos, sin, style)`: q, k `[B, heads, S, D]`; partial rotary rotates the first R dims only.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_parameters(config) -> dict:  # noqa: ANN001
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, style: str = "half") -> None:  # noqa: ANN001
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        self.style = style
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
        params = rope_parameters(self.config)
        rope_type = params["rope_type"]
        if rope_type == "default":
            dim = int(self.head_dim * params.get("partial_rotary_factor", 1.0))
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
            return inv_freq, 1.0
        if rope_type in ("dynamic", "longrope"):
            raise NotImplementedError(f"rope_type {rope_type!r} (sequence-length dependent) is not supported")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, device)
        return inv_freq, float(scaling)

    def reset_parameters(self, device: torch.device | None = None) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building on the meta device."""
        inv_freq, self.attention_scaling = self.compute_inv_freq(device)
        self.inv_freq = nn.Buffer(inv_freq.to(device), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1) if self.style == "half" else freqs
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def _rope_interleave(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # pairs (x0, x1), (x2, x3), ... rotated by one frequency each; output de-interleaved (DeepSeek convention)
    cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rope_gpt_oss(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


_ROPE = {"half": _rope_half, "interleave": _rope_interleave, "gpt_oss": _rope_gpt_oss}


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "half"
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _ROPE[style]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return fn(q, cos, sin), fn(k, cos, sin)
