"""OLMoE / FlexOlmo: per-expert `mlp.experts.{e}.*_proj` (G1), experts sized by `intermediate_size`.

transformers 5.24 maps both to qwen2_moe's converters; no renames.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register
from ..spec import ModelSpec

_FIELDS = {
    "family": "olmoe",
    "groups": swiglu_groups(),
    "num_experts_fields": ("num_experts",),
    "intermediate_fields": ("intermediate_size",),
}

register(
    ModelSpec(mapping=MoEMapping(model_type="olmoe", **_FIELDS), zoo="automodel_convert.models.olmoe.OlmoeForCausalLM"),
    MoEMapping(model_type="flex_olmo", **_FIELDS),
)
