"""GLM-4.7-Flash / GLM-4 MoE Lite (transformers model_type "glm4_moe_lite").

Attention: DeepSeek-V3's multi-head latent attention (models/common/mla.py; transformers' `Glm4MoeLiteAttention`
is `DeepseekV3Attention`), interleaved rope on `qk_rope_head_dim` dims when `rope_interleave`.
Feed-forward: dense SwiGLU (`intermediate_size`) where `mlp_layer_types[i] == "dense"` (by default the first layer
only), else the GLM-4.5 / DeepSeek-style sigmoid MoE (`e_score_correction_bias`, group-limited top-k,
`routed_scaling_factor`, shared experts; see deepseek_v3.py).
Loss: cross-entropy only.
"""

from __future__ import annotations

from torch import nn

from .common.mla import MLAttention
from .common.model import MoECausalLM
from .common.moe import DenseMLP
from .deepseek_v3 import sigmoid_moe


class Glm4MoeLiteForCausalLM(MoECausalLM):
    model_type = "glm4_moe_lite"  # its record: convert/families (ModelSpec.zoo names this class)

    def build_layer(self, layer_idx: int) -> nn.Module:
        c, be = self.config, self.backend
        attn = MLAttention(c, impl=be.attn, linear_impl=be.linear, norm_impl=be.rms_norm)
        if c.mlp_layer_types[layer_idx] == "sparse":
            mlp = sigmoid_moe(self)
        else:
            mlp = DenseMLP(c.hidden_size, c.intermediate_size, c.hidden_act, be.linear)
        return self.layer(attn, mlp)
