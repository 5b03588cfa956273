"""EXAONE MoE: per-expert `mlp.experts.{e}.*_proj` (G1) plus one rename of the router's score bias.

transformers 5.24 ("exaone_moe"): qwen2_moe's converters and `mlp.e_score_correction_bias` ->
`mlp.gate.e_score_correction_bias`.
"""

from ..mapping import MoEMapping, Rename, swiglu_groups
from ..registry import register

register(
    MoEMapping(
        model_type="exaone_moe",
        family="exaone",
        groups=swiglu_groups(),
        renames=(Rename("{prefix}layers.{layer}.mlp.e_score_correction_bias", "{prefix}layers.{layer}.mlp.gate.e_score_correction_bias"),),
        num_experts_fields=("num_experts",),
        intermediate_fields=("moe_intermediate_size",),
        notes="mlp.e_score_correction_bias -> mlp.gate.e_score_correction_bias",
    ),
)
