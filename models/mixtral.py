"""Mixtral (transformers model_type "mixtral").

Attention: grouped-query attention without biases or qk-norm; sliding window when `sliding_window` is set.
Feed-forward: every layer is MoE: softmax top-k router (`mlp.gate.weight`), always renormalised, routing weights
kept in fp32 (as transformers does), optional multiplicative input jitter in training (`router_jitter_noise`);
fused experts of size `intermediate_size` (on disk `block_sparse_moe.experts.e.w1/w3/w2`, fused by convert/).
Loss: cross-entropy plus the load-balancing loss when router logits are requested.
"""

from __future__ import annotations

from torch import nn

from .common.model import MoECausalLM
from .common.moe import MoEBlock
from .common.router import SoftmaxTopKRouter


class MixtralForCausalLM(MoECausalLM):
    model_type = "mixtral"  # its record: convert/families (ModelSpec.zoo names this class)
    has_aux_loss = True

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        attn = self.gqa(layer_idx, qkv_bias=False, o_bias=False)
        router = SoftmaxTopKRouter(
            c.num_local_experts, c.hidden_size, c.num_experts_per_tok, norm_topk_prob=True, keep_fp32_weights=True
        )
        mlp = MoEBlock(
            router, self.experts(c.num_local_experts, c.intermediate_size),
            jitter_noise=float(getattr(c, "router_jitter_noise", 0.0) or 0.0),
        )
        return self.layer(attn, mlp)
