"""Hunyuan-A13B (hunyuan_v1_moe): per-expert `mlp.experts.{e}.*_proj` (G1), experts sized by `intermediate_size`.

transformers 5.24 maps it to qwen2_moe's converters; the router `mlp.gate.wg` and `mlp.shared_mlp.*` pass through.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping(
        model_type="hunyuan_v1_moe",
        family="hunyuan",
        groups=swiglu_groups(),
        num_experts_fields=("num_experts",),
        intermediate_fields=("intermediate_size",),
    ),
)
