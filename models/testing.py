"""Tiny transformers v5 configs and comparison helpers for the zoo's tests (tests/test_models_*.py) and smoke runs.

Contract: `tiny_config(model_type, **overrides)` is a transformers config with H=64, I=40, 6-12 experts, 2-4 layers,
vocab 97, including the family's dense layers / shared experts / sliding windows; `tiny_hf_model` builds the
transformers model (float32, seeded, eval mode) with norms, biases, sinks and correction biases perturbed so that a
wrong use of any of them shows.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# H=64, I=40 (non-square), 6-12 experts, a dense layer and shared experts where the family has them
ZOO = {
    "qwen3_moe": dict(
        intermediate_size=96, moe_intermediate_size=40, num_experts=8, num_experts_per_tok=2, head_dim=24,
        mlp_only_layers=[0], norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01,
    ),
    "qwen2_moe": dict(
        intermediate_size=96, moe_intermediate_size=40, num_experts=10, num_experts_per_tok=3,
        shared_expert_intermediate_size=48, decoder_sparse_step=2, num_hidden_layers=4, use_sliding_window=True,
        sliding_window=6, max_window_layers=2, output_router_logits=True, router_aux_loss_coef=0.02,
    ),
    "olmoe": dict(intermediate_size=40, num_experts=6, num_experts_per_tok=2, clip_qkv=1.5, norm_topk_prob=False),
    "mixtral": dict(intermediate_size=40, num_local_experts=8, num_experts_per_tok=2, sliding_window=6, output_router_logits=True),
    "deepseek_v3": dict(
        intermediate_size=96, moe_intermediate_size=40, n_routed_experts=12, num_experts_per_tok=3, n_group=4,
        topk_group=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, n_shared_experts=2, num_key_value_heads=4, routed_scaling_factor=2.5,
    ),
    "glm4_moe": dict(
        intermediate_size=96, moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, head_dim=24, use_qk_norm=True, n_shared_experts=1, attention_bias=True,
    ),
    "glm4_moe_lite": dict(
        intermediate_size=96, moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        n_shared_experts=1, num_key_value_heads=4, routed_scaling_factor=1.8,
    ),
    "dots1": dict(
        intermediate_size=96, moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, first_k_dense_replace=1, n_shared_experts=1, sliding_window=6, max_window_layers=1,
    ),
    "gpt_oss": dict(
        intermediate_size=40, num_local_experts=8, num_experts_per_tok=2, head_dim=24, sliding_window=6,
        output_router_logits=True, router_aux_loss_coef=0.05,
    ),
}
FALLBACK = {
    "phimoe": dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2),
    "hunyuan_v1_moe": dict(intermediate_size=40, num_experts=6, moe_topk=2, head_dim=16),
    "ernie4_5_moe": dict(
        intermediate_size=96, moe_intermediate_size=40, moe_num_experts=6, moe_k=2, moe_layer_start_index=1,
        moe_num_shared_experts=1,
    ),
    "deepseek_v2": dict(
        intermediate_size=96, moe_intermediate_size=40, n_routed_experts=6, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=12, n_shared_experts=1, num_key_value_heads=4,
    ),
    "jamba": dict(
        intermediate_size=40, num_experts=6, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_expand=2,
    ),
    "flex_olmo": dict(intermediate_size=40, num_experts=6, num_experts_per_tok=2),
    "minimax": dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2, head_dim=16),
    "granitemoe": dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2),
}


def tiny_config(model_type: str, **overrides):  # noqa: ANN201
    table = ZOO if model_type in ZOO else FALLBACK
    return AutoConfig.for_model(model_type, **{**COMMON, **table[model_type], **overrides})


def tiny_hf_model(model_type: str, seed: int = 0, attn: str = "eager", experts: str = "eager", **overrides):  # noqa: ANN201
    """A transformers model in float32 with random weights, norms/biases perturbed so that they matter."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, experts_implementation=experts)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model.eval()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def grad_diffs(ref: torch.nn.Module, ours: torch.nn.Module) -> dict[str, float]:
    """Per-parameter max |grad difference|; inf where exactly one side has no gradient."""
    g_ref = dict(ref.named_parameters())
    out = {}
    for name, p in ours.named_parameters():
        q = g_ref[name]
        if p.grad is None or q.grad is None:
            out[name] = 0.0 if p.grad is None and q.grad is None else float("inf")
        else:
            out[name] = max_abs(p.grad, q.grad)
    return out
