"""Kimi Linear: Mixtral-named experts (`block_sparse_moe.experts.{e}.w1/w3/w2`) plus KDA linear-attention renames.

transformers 5.24 ("kimi_linear"): `self_attn.{f_a_proj,f_b_proj,dt_bias,A_log}` -> `self_attn.forget_gate.*`,
`self_attn.{q,k,v}_conv1d.weight` concatenated along dim 0 into `self_attn.conv1d.weight` (a non-stacked fusion
here: no expert dim, split back exactly), `.block_sparse_moe.` -> `.mlp.` (dense layers, shared experts, router and
its score bias too), then the usual `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`.
"""

from ..mapping import MoEMapping, Rename, swiglu_groups, tensor_fusion
from ..registry import register

_ATTN = "{prefix}layers.{layer}.self_attn"
_CONV = tensor_fusion(
    f"{_ATTN}.conv1d.weight",
    tuple(f"{_ATTN}.{p}_conv1d.weight" for p in ("q", "k", "v")),
)

register(
    MoEMapping(
        model_type="kimi_linear",
        family="kimi",
        groups=swiglu_groups(gate="w1", up="w3", down="w2") + (_CONV,),
        renames=(
            Rename(f"{_ATTN}.f_a_proj.{{rest}}", f"{_ATTN}.forget_gate.f_a_proj.{{rest}}"),
            Rename(f"{_ATTN}.f_b_proj.{{rest}}", f"{_ATTN}.forget_gate.f_b_proj.{{rest}}"),
            Rename(f"{_ATTN}.dt_bias", f"{_ATTN}.forget_gate.dt_bias"),
            Rename(f"{_ATTN}.A_log", f"{_ATTN}.forget_gate.A_log"),
            Rename("{prefix}layers.{layer}.block_sparse_moe.{rest}", "{prefix}layers.{layer}.mlp.{rest}"),
        ),
        num_experts_fields=("num_experts",),
        intermediate_fields=("moe_intermediate_size",),
        notes="q/k/v_conv1d -> conv1d (non-expert fusion); f_a/f_b_proj, dt_bias, A_log -> forget_gate.*",
    ),
)
