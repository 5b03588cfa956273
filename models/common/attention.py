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
- `DocumentMasks(doc_ids [B, S])`: a `Masks` for packed documents (runs of equal ids in a row; rows never share a
  document): causal AND same-document. `attention()` then runs `torch.nn.attention.varlen.varlen_attn` (flash,
  causal per document, the rows concatenated, `cu_seqlens` from the ids) when `varlen_blocker` finds nothing against
  it (CUDA, fp16/bf16, no sliding window, no sinks, no dropout, no KV cache, head dims the kernel takes) and impl is
  "auto", "sdpa" or "flash". Otherwise "auto"/"sdpa" and "eager" take the explicit block-causal mask, and "flash"/"te"
  refuse (one-line NotImplementedError): documents never see each other. `kernel` "auto" | "varlen" (refuse where varlen cannot run) | "mask" (always the
  explicit mask); `kernels` counts what each call ran ("varlen", "sdpa-mask", "eager-mask") and `why` holds the
  reasons varlen did not.
- `GQAttention`: parameters `q_proj, k_proj, v_proj, o_proj[, q_norm, k_norm][, sinks]` named as in transformers.
  qk_norm "head" normalises each head (Qwen3, GLM, dots1), "full" the whole projection (OLMoE). Rotary in the
  "half" style runs as one fused Triton kernel on CUDA when `rope_impl` is "triton"/"auto" (kernels.rope_half); with
  qk_norm "head" and Triton RMSNorms too, both norms and both rotations are one kernel (kernels.qk_norm_rope,
  bit-identical to the separate kernels).
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import pick_attn, triton_ok
from .norms import RMSNorm, _compiling, make_rms_norm
from .rotary import apply_rotary

if TYPE_CHECKING:
    from transformers import Cache

FUSE_QK_NORM_ROPE = True  # benchmarks set False to measure the separate kernels (host_overhead.py --ab-qk, train_bench.py --unfused-qk)


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


DOCUMENT_KERNELS = ("auto", "varlen", "mask")


def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`doc_ids [B, S]` -> (`cu_seqlens` int32 `[N + 1]`, longest document) over the rows concatenated: a document is
    a run of equal ids in a row, and a row start always starts one. Ids that decrease along a row (a document in two
    runs, which the explicit mask would join) are a ValueError. On the ids' device; one host sync."""
    b, s = doc_ids.shape
    step = doc_ids[:, 1:] - doc_ids[:, :-1]
    start = torch.ones(b, s, dtype=torch.bool, device=doc_ids.device)
    start[:, 1:] = step != 0
    first = start.reshape(-1).nonzero().reshape(-1)  # the sync
    cu = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
    longest, decreasing = torch.stack([(cu[1:] - cu[:-1]).max(), (step < 0).any().to(cu.dtype)]).tolist()
    if decreasing:
        raise ValueError("doc_ids decrease along a row: a packed document must be one run of equal ids")
    return cu, longest


class DocumentMasks(Masks):
    """Causal + same-document masks of packed rows (see the module docstring); `padding` is all true, so a kernel
    that cannot take a mask (flash, te) refuses instead of attending across documents."""

    def __init__(self, doc_ids: torch.Tensor, device: torch.device | None = None, kernel: str = "auto") -> None:
        if kernel not in DOCUMENT_KERNELS:
            raise ValueError(f"DocumentMasks(kernel={kernel!r}): choose one of {', '.join(DOCUMENT_KERNELS)}")
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [batch, seq], not {tuple(doc_ids.shape)}")
        device = doc_ids.device if device is None else torch.device(device)
        super().__init__(torch.ones_like(doc_ids, dtype=torch.bool), doc_ids.shape[1], device)
        self.doc_ids = doc_ids.to(device)
        self.kernel = kernel
        self.kernels: dict[str, int] = {}
        self.why: list[str] = []
        self._cu: tuple[torch.Tensor, int] | None = None

    def _build(self, window: int | None, kv_len: int) -> torch.Tensor:
        """The causal (+ window) mask AND same-document: `[B, 1, S, kv_len]` bool."""
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, -kv_len:]
        return super()._build(window, kv_len) & same[:, None]

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """`(cu_seqlens, max_len)` of the rows concatenated, built once per pass (one host sync)."""
        if self._cu is None:
            self._cu = cu_seqlens(self.doc_ids)
        return self._cu

    def ran(self, kernel: str, why: str | None = None) -> None:
        self.kernels[kernel] = self.kernels.get(kernel, 0) + 1
        if why and why not in self.why:
            self.why.append(why)


@functools.cache
def varlen_api() -> tuple | None:
    """(`torch.nn.attention.varlen.varlen_attn`, its keyword names) or None where this torch has none (< 2.9)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415 - torch >= 2.9
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_blocker(
    device_type: str, dtype: torch.dtype, qk_dim: int, v_dim: int, *, sliding_window: int | None = None,
    sinks: bool = False, dropout: float = 0.0, cached: bool = False,
) -> str | None:
    """Why `varlen_attn` cannot run a document-masked call with these properties, or None when it can."""
    if varlen_api() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if device_type != "cuda":
        return f"varlen_attn runs on CUDA only, not {device_type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"varlen_attn needs float16/bfloat16, not {str(dtype).removeprefix('torch.')}"
    if sliding_window is not None:
        return "a sliding-window layer"
    if sinks:
        return "attention sinks"
    if dropout > 0:
        return "attention dropout"
    if cached:
        return "a KV cache"
    if v_dim > qk_dim or qk_dim > 256 or qk_dim % 8:
        return f"head dims {qk_dim}/{v_dim} (flash takes v <= qk <= 256, a multiple of 8)"
    return None


def _varlen(q, k, v, masks: DocumentMasks, scale: float) -> torch.Tensor:  # noqa: ANN001
    """Causal attention inside each document: the `B` rows concatenated into one `[B*S, H, D]` sequence cut by
    `cu_seqlens`. GQA through `enable_gqa` where this torch has it, else repeated key/value heads; a value head dim
    below the query's is zero-padded (and cut from the output)."""
    fn, params = varlen_api()
    b, hq, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    cu, longest = masks.cu_seqlens()
    qf = q.transpose(1, 2).reshape(b * s, hq, d)
    kf = k.transpose(1, 2).reshape(b * s, hkv, d)
    vf = v.transpose(1, 2).reshape(b * s, hkv, dv)
    if dv < d:
        vf = F.pad(vf, (0, d - dv))
    kw: dict = {}
    if "window_size" in params:  # torch >= 2.10: causal is window (-1, 0)
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scale
    else:
        qf = qf * (scale * d**0.5)
    if hq != hkv:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            n_rep = hq // hkv
            kf = kf[:, :, None].expand(b * s, hkv, n_rep, d).reshape(b * s, hq, d)
            vf = vf[:, :, None].expand(b * s, hkv, n_rep, vf.shape[-1]).reshape(b * s, hq, vf.shape[-1])
    out = fn(qf, kf, vf, cu, cu, longest, longest, **kw)
    return out[..., :dv].reshape(b, s, hq, dv)


def document_kernel(
    kernel: str, impl: str, device_type: str, dtype: torch.dtype, qk_dim: int, v_dim: int, *,
    sliding_window: int | None = None, sinks: bool = False, dropout: float = 0.0, cached: bool = False,
) -> tuple[str, str | None]:
    """(kernel, why not varlen) for a document-masked attention call with these properties: "varlen" (impl auto, sdpa
    or flash, where `varlen_blocker` finds nothing against it), else "sdpa-mask" (impl auto/sdpa) or "eager-mask"
    with the explicit block-causal mask. NotImplementedError (one line) where neither can run: `kernel` "varlen"
    that cannot, or impl "flash"/"te", which cannot take a mask."""
    if kernel == "mask":
        why = "the explicit mask was asked for"
    elif impl in ("eager", "te"):
        why = f"attn={impl}"
    else:
        why = varlen_blocker(device_type, dtype, qk_dim, v_dim, sliding_window=sliding_window, sinks=sinks,
                             dropout=dropout, cached=cached)
        if why is None:
            return "varlen", None
    if kernel == "varlen":
        raise NotImplementedError(f"packed documents through varlen_attn cannot run here: {why}")
    if impl in ("flash", "te"):
        raise NotImplementedError(f"attn={impl!r} cannot keep packed documents apart ({why}): use attn='sdpa' or "
                                  "--packing-mask causal")
    return ("eager-mask" if impl == "eager" else "sdpa-mask"), why


def _documents(q, k, v, masks: DocumentMasks, impl: str, window, sinks, dropout) -> str:  # noqa: ANN001
    """Run `document_kernel` for this call, record it on `masks`; "varlen" or the impl that takes the mask."""
    name, why = document_kernel(masks.kernel, impl, q.device.type, q.dtype, q.shape[-1], v.shape[-1], sliding_window=window,
                                sinks=sinks is not None, dropout=dropout, cached=k.shape[2] != q.shape[2] or masks.cache is not None)
    masks.ran(name, why)
    return "varlen" if name == "varlen" else impl


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
    if isinstance(masks, DocumentMasks):
        impl = _documents(q, k, v, masks, impl, sliding_window, sinks, dropout)
        if impl == "varlen":
            return _varlen(q, k, v, masks, scale)
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

    def _fused_qk_rope(self, q: torch.Tensor, cos: torch.Tensor) -> bool:
        """Per-head q/k norm and "half" rope as one Triton kernel: where both norms and the rope would run Triton."""
        if self.qk_norm != "head" or self.rope_style != "half" or not FUSE_QK_NORM_ROPE or _compiling() or q.numel() == 0:
            return False
        qn, kn = self.q_norm, self.k_norm
        return (
            isinstance(qn, RMSNorm) and isinstance(kn, RMSNorm) and triton_ok(q, self.rope_impl) and triton_ok(q, qn.impl)
            and triton_ok(q, kn.impl) and qn.cast_before_weight and kn.cast_before_weight
            and q.dtype == qn.weight.dtype == kn.weight.dtype and qn.variance_epsilon == kn.variance_epsilon
            and cos.shape[-1] <= self.head_dim
        )

    def _rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, S, heads, D]` in, rotated `[B, heads, S, D]` out."""
        if self.rope_style == "half" and not _compiling() and triton_ok(q, self.rope_impl):
            from .kernels import rope_half  # fused, on the [B, S, heads, D] layout

            return rope_half(q, cos, sin).transpose(1, 2), rope_half(k, cos, sin).transpose(1, 2)
        return apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, self.rope_style)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: Masks) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(b, s, -1, self.head_dim)
        k = k.view(b, s, -1, self.head_dim)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        if self._fused_qk_rope(q, cos):
            from .kernels import qk_norm_rope  # one launch for both norms and both rotations

            q, k = qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.variance_epsilon, cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self._rope(q, k, cos, sin)
        k, v = masks.update(self.layer_idx, k, v, self.sliding_window)
        out = attention(
            q, k, v, masks, scale=self.scaling, sliding_window=self.sliding_window, sinks=self.sinks,
            impl=self.impl, dropout=self.dropout, training=self.training, te_module=self.te_attn,
        )
        return self.o_proj(out.reshape(b, s, -1))
