"""dots.llm1 (rednote): DeepSeek-V3-like MoE, per-expert `mlp.experts.{e}.*_proj` (G1).

transformers 5.24 maps dots1 to qwen2_moe's converters; dense first-k layers, shared experts and the router score
bias pass through.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register
from ..spec import ModelSpec

register(
    ModelSpec(
        mapping=MoEMapping(
            model_type="dots1",
            family="dots",
            groups=swiglu_groups(),
            num_experts_fields=("n_routed_experts",),
            intermediate_fields=("moe_intermediate_size",),
        ),
        zoo="automodel_convert.models.dots1.Dots1ForCausalLM",
    ),
)
