"""GLM-4 MoE family: per-expert `mlp.experts.{e}.*_proj` (G1), DeepSeek-style router and shared experts.

transformers 5.24 maps glm4_moe, glm4_moe_lite (MLA attention) and glm4v_moe to qwen2_moe's converters. glm4v_moe
holds its language model under `model.language_model.` on disk and in the model (the `{prefix}` capture covers
it); the vision tower `model.visual.*` passes through untouched.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register
from ..spec import ModelSpec

_FIELDS = {
    "family": "glm",
    "groups": swiglu_groups(),
    "num_experts_fields": ("n_routed_experts",),
    "intermediate_fields": ("moe_intermediate_size",),
}

register(
    ModelSpec(
        mapping=MoEMapping(model_type="glm4_moe", **_FIELDS),
        zoo="automodel_convert.models.glm4_moe.Glm4MoeForCausalLM",
    ),
    ModelSpec(
        mapping=MoEMapping(model_type="glm4_moe_lite", **_FIELDS, notes="MLA attention passes through"),
        zoo="automodel_convert.models.glm4_moe_lite.Glm4MoeLiteForCausalLM",
    ),
    MoEMapping(
        model_type="glm4v_moe",
        **_FIELDS,
        text_config_field="text_config",
        notes="vision tower passes through",
        extra={"prefix": "model.language_model."},
    ),
)
