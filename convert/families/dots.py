"""dots.llm1 (rednote): DeepSeek-V3-like MoE, per-expert `mlp.experts.{e}.*_proj` (G1).

transformers 5.24 maps dots1 to qwen2_moe's converters; dense first-k layers, shared experts and the router score
bias pass through.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping(
        "dots1",
        "dots",
        swiglu_groups(),
        num_experts_fields=("n_routed_experts",),
        intermediate_fields=("moe_intermediate_size",),
    ),
)
