"""Jamba: per-expert `feed_forward.experts.{e}.*_proj` (G1'), experts sized by `intermediate_size`.

transformers 5.24 ("jamba"): `feed_forward.experts.*.gate|up -> feed_forward.experts.gate_up_proj [E, 2I, H]`,
`down -> feed_forward.experts.down_proj [E, H, I]`. Only every `expert_layer_period`-th layer holds experts; the
others keep a dense `feed_forward.*_proj` (pass-through), as do the Mamba mixers.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping(
        model_type="jamba",
        family="jamba",
        groups=swiglu_groups("{prefix}layers.{layer}.feed_forward.experts"),
        num_experts_fields=("num_experts",),
        intermediate_fields=("intermediate_size",),
    ),
)
