"""Qwen MoE families: `mlp.experts.{e}.{gate,up,down}_proj` per expert on the hub."""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping("qwen3_moe", "qwen", swiglu_groups()),
    # shared_expert + shared_expert_gate pass through; dense layers (decoder_sparse_step / mlp_only_layers) simply
    # have no expert keys.
    MoEMapping("qwen2_moe", "qwen", swiglu_groups()),
)
