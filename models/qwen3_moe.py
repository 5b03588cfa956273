"""Qwen3-MoE (transformers model_type "qwen3_moe").

Attention: grouped-query attention, per-head RMSNorm on q and k (qk-norm), rotary on the full head dim, biases when
`attention_bias`, sliding window when `use_sliding_window`.
Feed-forward: softmax top-k router (`mlp.gate.weight [E, H]`, renormalised when `norm_topk_prob`) over fused experts
(`mlp.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, I = `moe_intermediate_size`); a dense SwiGLU MLP
(`intermediate_size`) on layers listed in `mlp_only_layers` or skipped by `decoder_sparse_step`.
Loss: cross-entropy, plus `router_aux_loss_coef` * load-balancing loss when router logits are requested.
"""

from __future__ import annotations

from torch import nn

from .common.model import MoECausalLM, is_sparse_layer
from .common.moe import DenseMLP, MoEBlock
from .common.router import SoftmaxTopKRouter


class Qwen3MoeForCausalLM(MoECausalLM):
    model_type = "qwen3_moe"  # its record: convert/families (ModelSpec.zoo names this class)
    has_aux_loss = True

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        attn = self.gqa(layer_idx, qkv_bias=c.attention_bias, o_bias=c.attention_bias, qk_norm="head")
        if c.num_experts > 0 and is_sparse_layer(c, layer_idx):
            router = SoftmaxTopKRouter(c.num_experts, c.hidden_size, c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob)
            mlp = MoEBlock(router, self.experts(c.num_experts, c.moe_intermediate_size))
        else:
            mlp = DenseMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.backend.linear)
        return self.layer(attn, mlp)
