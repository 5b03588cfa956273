"""OLMoE (transformers model_type "olmoe").

Attention: grouped-query attention with RMSNorm over the whole q and k projections (not per head), optional
clamping of q, k, v to +-`clip_qkv`, biases when `attention_bias`.
Feed-forward: every layer is MoE: softmax top-k router (`mlp.gate.weight`, `norm_topk_prob`) over fused experts of
size `intermediate_size`.
Loss: cross-entropy plus the load-balancing loss when router logits are requested.
"""

from __future__ import annotations

from torch import nn

from .common.model import MoECausalLM
from .common.moe import MoEBlock
from .common.router import SoftmaxTopKRouter


class OlmoeForCausalLM(MoECausalLM):
    model_type = "olmoe"  # its record: convert/families (ModelSpec.zoo names this class)
    has_aux_loss = True

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        attn = self.gqa(
            layer_idx, qkv_bias=c.attention_bias, o_bias=c.attention_bias, qk_norm="full", clip_qkv=c.clip_qkv,
            sliding_window=None,  # transformers builds a plain causal mask for OLMoE
        )
        router = SoftmaxTopKRouter(c.num_experts, c.hidden_size, c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob)
        return self.layer(attn, MoEBlock(router, self.experts(c.num_experts, c.intermediate_size)))
