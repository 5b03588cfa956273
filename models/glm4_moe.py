"""GLM-4.5 MoE (transformers model_type "glm4_moe").

Attention: grouped-query attention with q/k/v biases when `attention_bias` (no output bias), optional per-head
qk-norm (`use_qk_norm`), partial rotary (`partial_rotary_factor`, default 0.5: the first half of each head rotates).
Feed-forward: dense SwiGLU on the first `first_k_dense_replace` layers, then the DeepSeek-style sigmoid MoE
(`e_score_correction_bias`, group-limited top-k, `routed_scaling_factor`, shared experts; see deepseek_v3.py).
Loss: cross-entropy only.
"""

from __future__ import annotations

from torch import nn

from .common.model import MoECausalLM, is_sparse_layer
from .common.moe import DenseMLP
from .deepseek_v3 import sigmoid_moe


class Glm4MoeForCausalLM(MoECausalLM):
    model_type = "glm4_moe"  # its record: convert/families (ModelSpec.zoo names this class)
    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        attn = self.gqa(layer_idx, qkv_bias=c.attention_bias, o_bias=False, qk_norm="head" if c.use_qk_norm else None)
        if is_sparse_layer(c, layer_idx):
            mlp = sigmoid_moe(self)
        else:
            mlp = DenseMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.backend.linear)
        return self.layer(attn, mlp)
