"""LongCat-Flash: per-expert `mlp.experts.{e}.*_proj` (G1); E is taken per tensor from the keys.

transformers 5.24 maps longcat_flash to qwen2_moe's converters, but its model allocates `gate_up_proj` for
`n_routed_experts + zero_expert_num` experts (and `down_proj` for `n_routed_experts`). Two layouts therefore exist:
- hub checkpoints: the `n_routed_experts` real experts only (zero experts are identities without weights), which
  transformers 5.24 cannot load; merged: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`;
- what transformers 5.24's `save_pretrained` writes: gate/up for `E + zero_expert_num` experts (the zero experts'
  rows are unused weights), down for `E`; merged: `gate_up_proj [E+Z, 2I, H]`, `down_proj [E, H, I]`, exactly its
  state dict.
Both round-trip byte for byte because the expert count comes from the keys of each tensor (no config field), with
`I = expert_ffn_hidden_size`; missing experts in between are still refused. The router (`classifier` and
`e_score_correction_bias` with E + zero rows), the per-layer pairs of attention blocks and dense mlps pass through.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping(
        model_type="longcat_flash",
        family="longcat",
        groups=swiglu_groups(),
        num_experts_fields=(),  # gate/up may hold E or E + zero_expert_num experts (see above); E from the keys
        intermediate_fields=("expert_ffn_hidden_size",),
        notes="hub: real experts only; transformers 5.24 writes gate/up for E + zero experts, down for E: both kept as they are",
        extra={"config": "n_routed_experts, zero_expert_num"},
    ),
)
