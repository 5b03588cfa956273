"""OLMoE / FlexOlmo: per-expert `mlp.experts.{e}.*_proj` (G1), experts sized by `intermediate_size`.

transformers 5.24 maps both to qwen2_moe's converters; no renames.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

_FIELDS = {"num_experts_fields": ("num_experts",), "intermediate_fields": ("intermediate_size",)}

register(
    MoEMapping("olmoe", "olmoe", swiglu_groups(), **_FIELDS),
    MoEMapping("flex_olmo", "olmoe", swiglu_groups(), **_FIELDS),
)
