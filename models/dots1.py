"""dots.llm1 (transformers model_type "dots1").

Attention: grouped-query attention with per-head qk-norm, biases when `attention_bias`, sliding window on the
layers `layer_types` marks "sliding_attention".
Feed-forward: dense SwiGLU on the first `first_k_dense_replace` layers, then the DeepSeek-style sigmoid MoE
(`e_score_correction_bias`, group-limited top-k, `routed_scaling_factor`, shared experts; see deepseek_v3.py).
Loss: cross-entropy only.
"""

from __future__ import annotations

from torch import nn

from .common.model import MoECausalLM, is_sparse_layer
from .common.moe import DenseMLP
from .deepseek_v3 import sigmoid_moe


class Dots1ForCausalLM(MoECausalLM):
    model_type = "dots1"  # its record: convert/families (ModelSpec.zoo names this class)
    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        attn = self.gqa(layer_idx, qkv_bias=c.attention_bias, o_bias=c.attention_bias, qk_norm="head")
        if is_sparse_layer(c, layer_idx):
            mlp = sigmoid_moe(self)
        else:
            mlp = DenseMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.backend.linear)
        return self.layer(attn, mlp)
