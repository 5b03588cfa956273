"""GPT-OSS (transformers model_type "gpt_oss").

Attention: grouped-query attention with biases, one learned sink logit per head (`self_attn.sinks`), sliding window
on alternate layers (`layer_types`), rotary on halves of the head (`rope_style="gpt_oss"`).
Feed-forward: every layer is MoE: router with bias (`mlp.router.weight`, `mlp.router.bias`) taking the top-k logits
and a softmax over them; experts in the transposed, interleaved layout with biases (`gate_up_proj [E, H, 2I]` gate =
even columns, `gate_up_proj_bias [E, 2I]`, `down_proj [E, I, H]`, `down_proj_bias [E, H]`) and the clamped SwiGLU
`(clamp(up, +-limit) + 1) * g * sigmoid(alpha * g)`, g = clamp(gate, max=limit).
RMSNorm rounds after the weight multiply (transformers' GptOssRMSNorm); norms stay fp32 under fp16.
Loss: cross-entropy plus the load-balancing loss when router logits are requested.
"""

from __future__ import annotations

from torch import nn

from .common.model import MoECausalLM
from .common.moe import MoEBlock
from .common.router import SoftmaxTopKRouter


class GptOssForCausalLM(MoECausalLM):
    model_type = "gpt_oss"  # its record: convert/families (ModelSpec.zoo names this class)
    has_aux_loss = True
    rope_style = "gpt_oss"
    norm_cast_before_weight = False
    keep_fp32_for_fp16 = ("post_attention_layernorm", "input_layernorm", "norm")

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        attn = self.gqa(layer_idx, qkv_bias=c.attention_bias, o_bias=c.attention_bias, sinks=True)
        router = SoftmaxTopKRouter(c.num_local_experts, c.hidden_size, c.num_experts_per_tok, scoring="topk_softmax", bias=True)
        experts = self.experts(
            c.num_local_experts, c.intermediate_size, layout="gpt_oss",
            swiglu_alpha=getattr(c, "swiglu_alpha", 1.702), swiglu_limit=getattr(c, "swiglu_limit", 7.0),
        )
        return self.layer(attn, MoEBlock(router, experts, router_name="router"))
