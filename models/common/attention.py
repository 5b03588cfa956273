"""Grouped-query attention (optional qk-norm, partial rotary, clip, sinks, sliding window) and the attention kernels.

Contract:
- `Masks(attention_mask [B, past + S] | None, seq_len, device, cache, past)`: built once per forward. Causal always;
  padding (1 = keep) and a per-layer sliding window (key j visible from query i iff i - window < j <= i,
  transformers' rule) on top. It also carries the forward's KV cache (transformers' DynamicCache, or None):
  `masks.update(layer_idx, k, v)` appends the new keys/values and returns what the layer attends to.
- `attention(q, k, v, masks, *, scale, sliding_window, sinks, impl, module)`: q `[B, Hq, S, D]`, k `[B, Hkv, S, D]`,
  v `[B, Hkv, S, Dv]` -> `[B, S, Hq, Dv]`. impl "auto" (flash-attn for plain causal half-precision CUDA calls when
  installed, else sdpa), "sdpa" (is_causal fast path when there is no padding/window), "eager"
  (transformers' eager math), "flash" (flash-attn, no padding mask), "te" (transformer-engine).
  Sinks (GPT-OSS, one logit per head that takes probability mass and contributes nothing) run in "eager" and "sdpa"
  (an extra all-zero key/value column whose additive mask is the sink logit: exact, but it needs an explicit mask).
- `GQAttention`: parameters `q_proj, k_proj, v_proj, o_proj[, q_norm, k_norm][, sinks]` named as in transformers.
  qk_norm "head" normalises each head (Qwen3, GLM, dots1), "full" the whole projection (OLMoE). Rotary in the
  "half" style runs as one fused Triton kernel on CUDA when `rope_impl` is "triton"/"auto" (kernels.rope_half).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import pick_attn, triton_ok
from .norms import _compiling, make_rms_norm
from .rotary import apply_rotary

if TYPE_CHECKING:
    from transformers import Cache


def make_linear(in_features: int, out_features: int, bias: bool, impl: str = "torch") -> nn.Module:
    """nn.Linear, or transformer-engine's Linear for impl "te" (same parameter names `weight`, `bias`)."""
    if impl == "te":
        import transformer_engine.pytorch as te  # noqa: PLC0415 - optional, checked by BackendConfig

        return te.Linear(in_features, out_features, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


class Masks:
    """Causal (+ padding, + sliding window) masks for one forward pass, built lazily and cached per window and key
    count, plus the KV cache of that pass (None when there is none).

    With a cache the pass holds `seq_len` new tokens after `past` cached ones: query i is token `past + i`, and the
    `kv_len` keys a layer attends to are the last `kv_len` tokens (transformers' DynamicCache returns every cached
    key of a full-attention layer and the last `window - 1 + seq_len` of a sliding one). `attention_mask` then
    covers all `past + seq_len` tokens, as in transformers.
    """

    def __init__(
        self,
        attention_mask: torch.Tensor | None,
        seq_len: int,
        device: torch.device,
        cache: Cache | None = None,
        past: int = 0,
    ) -> None:
        self.padding = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        if self.padding is not None and self.padding.shape[-1] != past + seq_len:
            raise ValueError(f"attention_mask covers {self.padding.shape[-1]} tokens, not cached + new = {past + seq_len}")
        self.seq_len = seq_len
        self.device = device
        self.cache = cache
        self.past = past
        self._cache: dict[tuple[int | None, int], torch.Tensor] = {}

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, H, kv_len, D]` to attend to: this pass's `k`, `v` alone, or appended to the cache."""
        if self.cache is None:
            return k, v
        kept = getattr(self.cache.layers[layer_idx], "sliding_window", None)
        if kept is not None and (window is None or window > kept):
            raise ValueError(f"layer {layer_idx}: the cache keeps a {kept}-token window, the layer attends to {window}")
        return self.cache.update(k, v, layer_idx)

    def needs_mask(self, window: int | None, kv_len: int | None = None) -> bool:
        """False when plain causal attention is right: sdpa's `is_causal` (square) or no mask at all (one query)."""
        kv_len = self.seq_len if kv_len is None else kv_len
        if self.padding is not None or (kv_len != self.seq_len and self.seq_len != 1):
            return True
        return window is not None and window < kv_len

    def bool_mask(self, window: int | None, kv_len: int | None = None) -> torch.Tensor:
        """`[B or 1, 1, S, kv_len]` bool, True where the key is visible."""
        kv_len = self.seq_len if kv_len is None else kv_len
        key = (window if window is not None and window < self.past + self.seq_len else None, kv_len)
        if key not in self._cache:
            self._cache[key] = self._build(key[0], kv_len)
        return self._cache[key]

    def _build(self, window: int | None, kv_len: int) -> torch.Tensor:
        total = self.past + self.seq_len
        q = torch.arange(self.past, total, device=self.device)[:, None]
        k = torch.arange(total - kv_len, total, device=self.device)[None, :]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        allowed = allowed[None, None]
        if self.padding is not None:
            allowed = allowed & self.padding[:, None, None, total - kv_len :]
        return allowed


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _eager(q, k, v, masks, scale, window, sinks, dropout, training):  # noqa: ANN001, ANN202
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    min_value = torch.finfo(scores.dtype).min
    scores = scores + torch.where(masks.bool_mask(window, k.shape[2]), 0.0, min_value).to(scores.dtype)
    if sinks is None:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1).to(scores.dtype)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(v.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v).transpose(1, 2)


def _sdpa(q, k, v, masks, scale, window, sinks, dropout):  # noqa: ANN001, ANN202
    n_rep = q.shape[1] // k.shape[1]
    if sinks is None and not masks.needs_mask(window, k.shape[2]):
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=n_rep > 1
        )
        return out.transpose(1, 2)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    mask = masks.bool_mask(window, k.shape[2])
    if sinks is not None:
        b, h, s, _ = q.shape
        kv_len = k.shape[2]
        k = torch.cat([k, k.new_zeros(b, h, 1, k.shape[-1])], dim=2)
        v = torch.cat([v, v.new_zeros(b, h, 1, v.shape[-1])], dim=2)
        add = torch.where(mask, 0.0, float("-inf")).to(q.dtype).expand(b, h, s, kv_len)
        add = torch.cat([add, sinks.to(q.dtype).view(1, h, 1, 1).expand(b, h, s, 1)], dim=-1)
        mask = add
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2)


def _flash(q, k, v, masks, scale, window, sinks, dropout):  # noqa: ANN001, ANN202
    if masks.padding is not None or sinks is not None:
        raise NotImplementedError("attn='flash' supports neither padding masks nor sinks here: use attn='sdpa'")
    from flash_attn import flash_attn_func  # noqa: PLC0415 - optional, checked by BackendConfig

    win = (-1, -1) if window is None else (window - 1, 0)
    return flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, softmax_scale=scale,
        causal=True, window_size=win,
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: Masks,
    *,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    impl: str = "sdpa",
    dropout: float = 0.0,
    training: bool = False,
    te_module: nn.Module | None = None,
) -> torch.Tensor:
    """`[B, S, Hq, Dv]`; see the module docstring."""
    dropout = dropout if training else 0.0
    plain = sinks is None and not masks.needs_mask(sliding_window, k.shape[2]) and q.shape[-1] == v.shape[-1]
    impl = pick_attn(impl, q, plain)
    if impl == "te" and k.shape[2] != q.shape[2]:
        impl = "sdpa"  # TE's module is built for self-attention over the pass's own tokens: cached decoding is sdpa
    if impl == "eager":
        return _eager(q, k, v, masks, scale, sliding_window, sinks, dropout, training)
    if impl == "sdpa":
        return _sdpa(q, k, v, masks, scale, sliding_window, sinks, dropout)
    if impl == "flash":
        return _flash(q, k, v, masks, scale, sliding_window, sinks, dropout)
    if impl == "te":
        if masks.needs_mask(sliding_window) or sinks is not None:
            raise NotImplementedError("attn='te' runs plain causal attention only: use attn='sdpa'")
        out = te_module(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # bshd, [B, S, Hq*Dv]
        return out.view(q.shape[0], q.shape[2], q.shape[1], -1)
    raise ValueError(f"unknown attention implementation {impl!r}")


def make_te_attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, impl: str) -> nn.Module | None:
    if impl != "te":
        return None
    import transformer_engine.pytorch as te  # noqa: PLC0415

    return te.DotProductAttention(
        num_heads, head_dim, num_gqa_groups=num_kv_heads, attn_mask_type="causal", qkv_format="bshd",
        softmax_scale=scale,
    )


class GQAttention(nn.Module):
    """Grouped-query attention; see the module docstring for the variants."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        clip_qkv: float | None = None,
        sinks: bool = False,
        sliding_window: int | None = None,
        rope_style: str = "half",
        dropout: float = 0.0,
        impl: str = "sdpa",
        linear_impl: str = "torch",
        norm_impl: str = "torch",
        rope_impl: str = "torch",
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_impl = rope_impl
        self.scaling = head_dim**-0.5
        self.q_proj = make_linear(hidden_size, num_heads * head_dim, qkv_bias, linear_impl)
        self.k_proj = make_linear(hidden_size, num_kv_heads * head_dim, qkv_bias, linear_impl)
        self.v_proj = make_linear(hidden_size, num_kv_heads * head_dim, qkv_bias, linear_impl)
        self.o_proj = make_linear(num_heads * head_dim, hidden_size, o_bias, linear_impl)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm = make_rms_norm(head_dim, norm_eps, norm_impl)
            self.k_norm = make_rms_norm(head_dim, norm_eps, norm_impl)
        elif qk_norm == "full":
            self.q_norm = make_rms_norm(num_heads * head_dim, norm_eps, norm_impl)
            self.k_norm = make_rms_norm(num_kv_heads * head_dim, norm_eps, norm_impl)
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None, 'head' or 'full', not {qk_norm!r}")
        self.sinks = nn.Parameter(torch.empty(num_heads)) if sinks else None
        self.clip_qkv = clip_qkv
        self.sliding_window = sliding_window
        self.rope_style = rope_style
        self.dropout = dropout
        self.impl = impl
        self.te_attn = make_te_attention(num_heads, num_kv_heads, head_dim, self.scaling, impl)
        self.layer_idx = 0  # its index in the decoder (the KV cache's layer), set by the model that holds it

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: Masks) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(b, s, -1, self.head_dim)
        k = k.view(b, s, -1, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.rope_style == "half" and not _compiling() and triton_ok(q, self.rope_impl):
            from .kernels import rope_half  # fused, on the [B, S, heads, D] layout

            q, k = rope_half(q, cos, sin).transpose(1, 2), rope_half(k, cos, sin).transpose(1, 2)
        else:
            q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, self.rope_style)
        k, v = masks.update(self.layer_idx, k, v, self.sliding_window)
        out = attention(
            q, k, v, masks, scale=self.scaling, sliding_window=self.sliding_window, sinks=self.sinks,
            impl=self.impl, dropout=self.dropout, training=self.training, te_module=self.te_attn,
        )
        return self.o_proj(out.reshape(b, s, -1))
