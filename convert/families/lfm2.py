"""LFM2-MoE: Mixtral-named experts under `feed_forward` (`feed_forward.experts.{e}.w1/w3/w2`), no renames.

transformers 5.24 ("lfm2_moe"): `feed_forward.experts.*.w1|w3 -> feed_forward.experts.gate_up_proj [E, 2I, H]`,
`w2 -> feed_forward.experts.down_proj [E, H, I]`. The first `num_dense_layers` layers keep a dense
`feed_forward.w1/w2/w3` (pass-through), as do `feed_forward.gate` and `feed_forward.expert_bias`.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping(
        model_type="lfm2_moe",
        family="lfm2",
        groups=swiglu_groups("{prefix}layers.{layer}.feed_forward.experts", gate="w1", up="w3", down="w2"),
        num_experts_fields=("num_experts",),
        intermediate_fields=("moe_intermediate_size",),
    ),
)
