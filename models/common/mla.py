"""DeepSeek multi-head latent attention (MLA), training form (latents expanded to per-head keys and values).

Contract: parameters as in transformers' DeepseekV3Attention: `q_proj` (no q LoRA) or `q_a_proj, q_a_layernorm,
q_b_proj`; `kv_a_proj_with_mqa [kv_lora_rank + rope_dim, H]`, `kv_a_layernorm [kv_lora_rank]`,
`kv_b_proj [heads * (nope_dim + v_dim), kv_lora_rank]`, `o_proj [H, heads * v_dim]`.
`forward(x [B, S, H], cos, sin, masks) -> [B, S, H]`; query/key head dim = nope + rope, value head dim = v_head_dim.
The rope part of the key is shared by all heads; `rope_interleave` selects DeepSeek's interleaved pairs. The softmax
scale includes YaRN's mscale when the rope type is not default (`yarn_mscale_scaling`).
attn='te' (and 'flash' when v_head_dim differs from the q/k head dim) runs as sdpa for MLA.
With a KV cache (`masks.cache`) the per-head keys (rope part expanded) and values are cached, as transformers does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Masks, attention, make_linear
from .norms import make_rms_norm
from .rotary import apply_rotary, rope_parameters


def yarn_mscale_scaling(config, scaling: float) -> float:  # noqa: ANN001
    params = rope_parameters(config)
    if params.get("rope_type", "default") != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        factor = params.get("factor", 1.0)
        if mscale_all_dim and factor > 1:
            mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scaling = scaling * mscale * mscale
    return scaling


class MLAttention(nn.Module):
    def __init__(
        self,
        config,  # noqa: ANN001 - a DeepSeek-style HF config
        *,
        impl: str = "sdpa",
        linear_impl: str = "torch",
        norm_impl: str = "torch",
    ) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        bias = bool(getattr(config, "attention_bias", False))
        if self.q_lora_rank is None:
            self.q_proj = make_linear(h, self.num_heads * self.qk_dim, False, linear_impl)
        else:
            self.q_a_proj = make_linear(h, self.q_lora_rank, bias, linear_impl)
            self.q_a_layernorm = make_rms_norm(self.q_lora_rank, 1e-6, norm_impl)
            self.q_b_proj = make_linear(self.q_lora_rank, self.num_heads * self.qk_dim, False, linear_impl)
        self.kv_a_proj_with_mqa = make_linear(h, self.kv_lora_rank + self.rope_dim, bias, linear_impl)
        self.kv_a_layernorm = make_rms_norm(self.kv_lora_rank, 1e-6, norm_impl)
        self.kv_b_proj = make_linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), False, linear_impl)
        self.o_proj = make_linear(self.num_heads * self.v_dim, h, bias, linear_impl)
        self.scaling = yarn_mscale_scaling(config, self.qk_dim**-0.5)
        self.rope_style = "interleave" if getattr(config, "rope_interleave", False) else "half"
        self.dropout = float(getattr(config, "attention_dropout", 0.0))
        # flash-attn needs equal q/v head dims and TE's module is not wired here: both run as sdpa for MLA
        self.impl = "sdpa" if impl == "te" or (impl == "flash" and self.v_dim != self.qk_dim) else impl
        self.layer_idx = 0  # its index in the decoder (the KV cache's layer), set by the model that holds it

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: Masks) -> torch.Tensor:
        b, s, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, -1, self.qk_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent)).view(b, s, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rot = k_rot.view(b, 1, s, self.rope_dim)
        q_rot, k_rot = apply_rotary(q_rot, k_rot, cos, sin, self.rope_style)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        k, v = masks.update(self.layer_idx, k, v)
        out = attention(
            q, k, v, masks, scale=self.scaling, impl=self.impl, dropout=self.dropout, training=self.training
        )
        return self.o_proj(out.reshape(b, s, -1))
