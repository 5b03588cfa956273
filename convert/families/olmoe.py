"""OLMoE: per-expert `mlp.experts.{e}.*_proj`, expert width from `intermediate_size`."""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping("olmoe", "olmoe", swiglu_groups(), intermediate_fields=("intermediate_size",)),
)
