"""Mixtral-style experts: `block_sparse_moe.experts.{e}.w1/w3/w2` (w1 = gate, w3 = up, w2 = down), G2.

transformers 5.24 (`conversion_mapping.py`, "mixtral", shared by minimax and minimax_m2; phimoe its own entry):
`.block_sparse_moe.` -> `.mlp.`, then `w1|w3 -> experts.gate_up_proj [E, 2I, H]`, `w2 -> experts.down_proj [E, H, I]`.
minimax_m2's `block_sparse_moe.e_score_correction_bias` follows the same rename; phimoe also renames its router
`mlp.gate.weight` -> `mlp.router.weight`. Experts are sized by `intermediate_size`, counted by `num_local_experts`.
"""

from ..mapping import MoEMapping, Rename, swiglu_groups
from ..registry import register
from ..spec import ModelSpec

_TO_MLP = (Rename("{prefix}layers.{layer}.block_sparse_moe.{rest}", "{prefix}layers.{layer}.mlp.{rest}"),)
_W_GROUPS = swiglu_groups(gate="w1", up="w3", down="w2")
_FIELDS = {
    "family": "mixtral",
    "groups": _W_GROUPS,
    "num_experts_fields": ("num_local_experts",),
    "intermediate_fields": ("intermediate_size",),
}

register(
    ModelSpec(
        mapping=MoEMapping(model_type="mixtral", renames=_TO_MLP, **_FIELDS),
        zoo="automodel_convert.models.mixtral.MixtralForCausalLM",
    ),
    MoEMapping(model_type="minimax", renames=_TO_MLP, **_FIELDS, notes="lightning-attention layers pass through"),
    MoEMapping(
        model_type="minimax_m2",
        renames=_TO_MLP,
        **_FIELDS,
        notes="router score bias block_sparse_moe.e_score_correction_bias -> mlp.",
    ),
    MoEMapping(
        model_type="phimoe",
        renames=_TO_MLP + (Rename("{prefix}layers.{layer}.mlp.gate.weight", "{prefix}layers.{layer}.mlp.router.weight"),),
        **_FIELDS,
        notes="router block_sparse_moe.gate.weight -> mlp.router.weight",
    ),
)
