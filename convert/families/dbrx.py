"""DBRX: the hub already stores the experts as the model holds them (G6), as 2-D `[E*I, H]` tensors.

transformers 5.24 has no conversion entry for dbrx: `transformer.blocks.L.ffn.experts.mlp.{w1,v1,w2}` are each
`[E*I, H]` (expert e owns rows `[e*I, (e+1)*I)`; w2 too), on disk and in the model. E and I live in `ffn_config`.
"""

from ..mapping import Layout, MoEMapping
from ..registry import register

_X = "{prefix}blocks.{layer}.ffn.experts.mlp"

register(
    MoEMapping(
        model_type="dbrx",
        family="dbrx",
        disk_layout=Layout.FUSED,
        expert_tensors=(f"{_X}.w1", f"{_X}.v1", f"{_X}.w2"),
        num_experts_fields=("moe_num_experts",),
        intermediate_fields=("ffn_hidden_size",),
        text_config_field="ffn_config",
        notes="disk equals model: w1, v1, w2 [E*I, H] (2-D, expert-major rows)",
        extra={"fused": "w1, v1, w2 [E*I,H]"},
    ),
)
