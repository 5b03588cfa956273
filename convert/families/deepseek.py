"""DeepSeek-V3 style: per-expert `mlp.experts.{e}.*_proj`, dense first-k layers, shared experts, score bias.

Block-FP8 checkpoints carry `weight_scale_inv` grids per expert; they fuse by the same rule as their weights
(companion of every group), keeping each source grid exact even when I is not a multiple of the block.
"""

from ..mapping import MoEMapping, swiglu_groups
from ..registry import register

register(
    MoEMapping("deepseek_v3", "deepseek", swiglu_groups()),
)
