"""Llama 4: the hub already stores the experts as the model holds them (G6).

transformers 5.24 has no conversion entry for llama4: `language_model.model.layers.L.feed_forward.experts.
gate_up_proj [E, H, 2I]` (gate|up concatenated along the last dim) and `down_proj [E, I, H]` on disk and in
`Llama4ForConditionalGeneration`; dense layers, the shared expert, the router and the vision tower pass through.
"""

from ..mapping import Layout, MoEMapping
from ..registry import register

_X = "{prefix}layers.{layer}.feed_forward.experts"

register(
    MoEMapping(
        model_type="llama4",
        family="llama4",
        disk_layout=Layout.FUSED,
        expert_tensors=(f"{_X}.gate_up_proj", f"{_X}.down_proj"),
        num_experts_fields=("num_local_experts",),
        intermediate_fields=("intermediate_size",),
        text_config_field="text_config",
        notes="disk equals model; vision tower passes through",
        extra={"fused": "gate_up_proj [E,H,2I], down_proj [E,I,H]"},
    ),
)
