"""GLM-4 MoE family: per-expert `mlp.experts.{e}.*_proj` (G1), DeepSeek-style router and shared experts.

transformers 5.24 maps glm4_moe, glm4_moe_lite (MLA attention) and glm4v_moe to qwen2_moe's converters. glm4v_moe
holds its language model under `model.language_model.` on disk and in the model (the `{prefix}` capture covers
it); the vision tower `model.visual.*` passes through untouched.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

_FIELDS = {"num_experts_fields": ("n_routed_experts",), "intermediate_fields": ("moe_intermediate_size",)}

register(
    MoEMapping("glm4_moe", "glm", swiglu_groups(), **_FIELDS),
    MoEMapping("glm4_moe_lite", "glm", swiglu_groups(), **_FIELDS, notes="MLA attention passes through"),
    MoEMapping(
        "glm4v_moe",
        "glm",
        swiglu_groups(),
        **_FIELDS,
        text_config_field="text_config",
        notes="vision tower passes through",
        extra={"prefix": "model.language_model."},
    ),
)
