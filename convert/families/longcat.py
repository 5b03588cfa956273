"""LongCat-Flash: per-expert `mlp.experts.{e}.*_proj` (G1) for the `n_routed_experts` real experts only.

transformers 5.24 maps longcat_flash to qwen2_moe's converters, but its model allocates `gate_up_proj` for
`n_routed_experts + zero_expert_num` experts (and `down_proj` for `n_routed_experts`), so it cannot load hub
checkpoints, whose zero (identity) experts have no weights. Here the fused tensors hold exactly the real experts:
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]` with `I = expert_ffn_hidden_size`; the router (`classifier` and
`e_score_correction_bias` with E + zero rows), the per-layer pairs of attention blocks and dense mlps pass through.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping(
        "longcat_flash",
        "longcat",
        swiglu_groups(),
        num_experts_fields=("n_routed_experts",),
        intermediate_fields=("expert_ffn_hidden_size",),
        notes="real experts only (zero experts have no weights; transformers 5.24 allocates gate_up_proj for them)",
    ),
)
