"""Qwen2-MoE (transformers model_type "qwen2_moe").

Attention: grouped-query attention with q/k/v biases (`qkv_bias`), no output bias, no qk-norm; sliding window on the
layers `layer_types` marks "sliding_attention".
Feed-forward: softmax top-k router (`mlp.gate.weight`, `norm_topk_prob`) over fused experts (I =
`moe_intermediate_size`), plus one shared expert (`mlp.shared_expert.{gate,up,down}_proj`, size
`shared_expert_intermediate_size`) scaled by a sigmoid gate (`mlp.shared_expert_gate.weight [1, H]`); dense MLP
on `mlp_only_layers` / by `decoder_sparse_step`.
Loss: cross-entropy plus the load-balancing loss when router logits are requested.
"""

from __future__ import annotations

from torch import nn

from .common.model import MoECausalLM, is_sparse_layer
from .common.moe import DenseMLP, MoEBlock
from .common.router import SoftmaxTopKRouter


class Qwen2MoeForCausalLM(MoECausalLM):
    model_type = "qwen2_moe"  # its record: convert/families (ModelSpec.zoo names this class)
    has_aux_loss = True

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        attn = self.gqa(layer_idx, qkv_bias=getattr(c, "qkv_bias", True), o_bias=False)
        if c.num_experts > 0 and is_sparse_layer(c, layer_idx):
            router = SoftmaxTopKRouter(c.num_experts, c.hidden_size, c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob)
            shared = DenseMLP(c.hidden_size, c.shared_expert_intermediate_size, c.hidden_act, self.backend.linear)
            mlp = MoEBlock(
                router, self.experts(c.num_experts, c.moe_intermediate_size), shared=shared, shared_name="shared_expert",
                shared_gate=True, hidden_size=c.hidden_size,
            )
        else:
            mlp = DenseMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.backend.linear)
        return self.layer(attn, mlp)
