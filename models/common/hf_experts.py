"""Our grouped experts as a transformers v5 experts implementation, for MoE types the zoo does not implement.

transformers' experts classes are decorated with `@use_experts_implementation`; their forward looks up
`config._experts_implementation` in `ExpertsInterface` (transformers/integrations/moe.py) and calls
`fn(self, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`. `register()` adds
`hf_experts_forward` under the key "automodel_grouped"; it reads the module's own flags (`has_gate`, `has_bias`,
`is_transposed`, `is_concatenated`, `has_post_expert_norm`, `_apply_gate`, `act_fn`) and runs the same sorted,
loop-free grouped GEMM path as the zoo (models/common/experts.py). Per-module attributes `automodel_impl` and
`automodel_swiglu` (set by `set_backend`) pick the grouped GEMM and SwiGLU back-ends ("auto" by default).
EP sentinels (ids >= num_experts) get weight 0 and a clamped id.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .experts import combine_rows, dispatch_plan, gather_rows, grouped_linear, swiglu

EXPERTS_KEY = "automodel_grouped"


def default_gate(module: nn.Module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    return getattr(type(module), "_apply_gate", None) is _default_apply_gate


def hf_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    num_experts = self.num_experts
    impl = getattr(self, "automodel_impl", "auto")
    idx, weights = top_k_index, top_k_weights
    if getattr(self, "_is_expert_parallel", False):
        sentinel = idx >= num_experts
        weights = weights.masked_fill(sentinel, 0.0)
        idx = idx.clamp(max=num_experts - 1)
    plan = dispatch_plan(idx, num_experts)
    kernels = getattr(self, "automodel_swiglu", "auto")
    xs = gather_rows(hidden_states, plan, kernels)
    row_w = weights.reshape(-1).index_select(0, plan.perm).to(hidden_states.dtype)
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    transposed = getattr(self, "is_transposed", False)
    post_norm = getattr(self, "has_post_expert_norm", False)
    fold = not post_norm  # the routing weight commutes with the (linear) down projection unless a norm follows

    w1 = self.gate_up_proj if has_gate else self.up_proj
    h = grouped_linear(xs, w1 if transposed else w1.transpose(1, 2), plan.offsets, plan.sorted_ids, impl)
    if has_bias:
        h = h + (self.gate_up_proj_bias if has_gate else self.up_proj_bias)[plan.sorted_ids].to(h.dtype)
    if has_gate and getattr(self, "is_concatenated", True) and default_gate(self) and getattr(self.config, "hidden_act", None) == "silu":
        a = swiglu(h, row_w if fold else None, impl=kernels)
    else:
        a = self._apply_gate(h) if has_gate else self.act_fn(h)
        a = a * row_w[:, None] if fold else a
    w2 = self.down_proj
    y = grouped_linear(a, w2 if transposed else w2.transpose(1, 2), plan.offsets, plan.sorted_ids, impl)
    if has_bias:
        b = self.down_proj_bias[plan.sorted_ids].to(y.dtype)
        y = y + (b * row_w[:, None] if fold else b)
    if post_norm:
        y = self.post_expert_norm(y) * row_w[:, None]
    return combine_rows(y, plan, kernels).to(hidden_states.dtype)


def register(key: str = EXPERTS_KEY) -> str:
    """Register `hf_experts_forward` in transformers' ExpertsInterface under `key` (idempotent)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:  # pragma: no cover - transformers < 5
        raise RuntimeError("this transformers has no ExpertsInterface (needs transformers >= 5)") from e
    ExpertsInterface.register(key, hf_experts_forward)
    return key


def set_backend(model: nn.Module, experts: str = "auto", swiglu_impl: str = "auto") -> int:
    """Set our back-end choices on every transformers experts module of `model`; returns how many were found."""
    n = 0
    for m in model.modules():
        if hasattr(m, "gate_up_proj") or (hasattr(m, "up_proj") and isinstance(m.up_proj, nn.Parameter)):
            m.automodel_impl, m.automodel_swiglu = experts, swiglu_impl
            n += 1
    return n


HF_ATTN = {"auto": None, "sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}


def hf_load_kwargs(backend: Any) -> dict[str, Any]:
    """transformers keyword arguments for a fallback model under `backend` (attention and experts)."""
    if backend.attn not in HF_ATTN:
        raise NotImplementedError(f"attn={backend.attn!r} is not available for transformers fallback models")
    kwargs: dict[str, Any] = {"experts_implementation": register()}
    if HF_ATTN[backend.attn] is not None:
        kwargs["attn_implementation"] = HF_ATTN[backend.attn]
    return kwargs
