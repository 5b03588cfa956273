"""Mixtral-style experts (`block_sparse_moe.experts.{e}.w1/w3/w2`, w1 = gate, w3 = up, w2 = down)."""

from ..mapping import MoEMapping, Rename, swiglu_groups
from ..registry import register

_TO_MLP = (Rename("{prefix}layers.{layer}.block_sparse_moe.{rest}", "{prefix}layers.{layer}.mlp.{rest}"),)
_W_GROUPS = swiglu_groups(gate="w1", up="w3", down="w2")

register(
    MoEMapping("mixtral", "mixtral", _W_GROUPS, _TO_MLP, intermediate_fields=("intermediate_size",)),
)
