"""DeepSeek-V3 (transformers model_type "deepseek_v3").

Attention: multi-head latent attention (models/common/mla.py): optional q LoRA (`q_a_proj`, `q_a_layernorm`,
`q_b_proj`), compressed kv (`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`), decoupled rope on
`qk_rope_head_dim` dims (interleaved pairs when `rope_interleave`), YaRN mscale in the softmax scale.
Feed-forward: the first `first_k_dense_replace` layers are dense SwiGLU (`intermediate_size`); the others route with
sigmoid scores, `e_score_correction_bias`, group-limited top-k (`n_group`, `topk_group`), renormalisation and
`routed_scaling_factor` (router weight and bias kept in fp32) over fused experts (`moe_intermediate_size`), plus
`n_shared_experts` shared experts as one MLP (`mlp.shared_experts.*`).
Loss: cross-entropy only (no auxiliary loss; `update_router_bias` is the aux-loss-free balancing step).
"""

from __future__ import annotations

from torch import nn

from .common.mla import MLAttention
from .common.model import MoECausalLM, is_sparse_layer
from .common.moe import DenseMLP, MoEBlock
from .common.router import SigmoidGroupRouter


def sigmoid_moe(model: MoECausalLM) -> MoEBlock:
    """The DeepSeek-style MoE block, shared by deepseek_v3, glm4_moe and dots1."""
    c, lin = model.config, model.backend.linear
    router = SigmoidGroupRouter(
        c.n_routed_experts, c.hidden_size, c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
        norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
    )
    n_shared = getattr(c, "n_shared_experts", 0) or 0
    shared = DenseMLP(c.hidden_size, c.moe_intermediate_size * n_shared, c.hidden_act, lin) if n_shared else None
    return MoEBlock(router, model.experts(c.n_routed_experts, c.moe_intermediate_size), shared=shared)


class DeepseekV3ForCausalLM(MoECausalLM):
    model_type = "deepseek_v3"  # its record: convert/families (ModelSpec.zoo names this class)
    def build_layer(self, layer_idx: int) -> nn.Module:
        c, be = self.config, self.backend
        attn = MLAttention(c, impl=be.attn, linear_impl=be.linear, norm_impl=be.rms_norm)
        if is_sparse_layer(c, layer_idx):
            mlp = sigmoid_moe(self)
        else:
            mlp = DenseMLP(c.hidden_size, c.intermediate_size, c.hidden_act, be.linear)
        return self.layer(attn, mlp)
