"""ERNIE 4.5 MoE: per-expert `mlp.experts.{e}.*_proj` (G1) plus one rename of the router's score bias.

transformers 5.24 ("ernie4_5_moe"): qwen2_moe's converters and `mlp.moe_statics.e_score_correction_bias` ->
`mlp.gate.moe_statics.e_score_correction_bias`. Dense layers before `moe_layer_start_index` pass through; the
embeddings are tied (no `lm_head.weight` on disk).
"""

from ..mapping import MoEMapping, Rename, swiglu_groups
from ..registry import register

register(
    MoEMapping(
        model_type="ernie4_5_moe",
        family="ernie",
        groups=swiglu_groups(),
        renames=(Rename("{prefix}layers.{layer}.mlp.moe_statics.{rest}", "{prefix}layers.{layer}.mlp.gate.moe_statics.{rest}"),),
        num_experts_fields=("moe_num_experts",),
        intermediate_fields=("moe_intermediate_size",),
        notes="mlp.moe_statics.* -> mlp.gate.moe_statics.*",
    ),
)
