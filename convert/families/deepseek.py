"""DeepSeek style: per-expert `mlp.experts.{e}.*_proj`, dense first-k layers, shared experts, score bias (G1).

transformers 5.24 maps deepseek_v2, deepseek_v3 and deepseek_v32 to qwen2_moe's converters. Dense first-k layers
(`first_k_dense_replace`), `mlp.shared_experts.*`, `mlp.gate.e_score_correction_bias`, MLA attention and
deepseek_v32's lightning indexer (`self_attn.indexer.*`) pass through.

Block-FP8 checkpoints carry `weight_scale_inv` grids per expert; they fuse by the same rule as their weights
(companion of every group), keeping each source grid exact even when I is not a multiple of the block.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register
from ..spec import ModelSpec

_FIELDS = {
    "family": "deepseek",
    "groups": swiglu_groups(),
    "num_experts_fields": ("n_routed_experts",),
    "intermediate_fields": ("moe_intermediate_size",),
}

register(
    ModelSpec(
        mapping=MoEMapping(model_type="deepseek_v3", **_FIELDS),
        zoo="automodel_convert.models.deepseek_v3.DeepseekV3ForCausalLM",
    ),
    MoEMapping(model_type="deepseek_v2", **_FIELDS),
    MoEMapping(model_type="deepseek_v32", **_FIELDS, notes="lightning indexer passes through"),
)
