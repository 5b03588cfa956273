"""The one split rule of the project: torch.chunk's, which DTensor's `Shard(dim)` follows.

`chunk_range(size, parts, index)` is `[lo, hi)` of part `index` when `size` rows are split into `parts`: every part
gets ceil(size / parts) rows except the last ones, which get what is left (possibly nothing). Expert parallelism
uses it for the experts of each ep rank (`ep_ranges`), loading and saving for every sharded tensor, and the token
dispatchers for which rank owns an expert.
"""

from __future__ import annotations

import math


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """`[lo, hi)` of part `index` when `size` is split into `parts` by torch.chunk's rule (DTensor's Shard)."""
    step = math.ceil(size / parts) if parts else 0
    return min(index * step, size), min((index + 1) * step, size)


def ep_ranges(num_experts: int, ep: int) -> list[range]:
    """Experts of each EP rank under DTensor's `Shard(0)` rule: the first ranks get ceil(E/ep)."""
    return [range(*chunk_range(num_experts, ep, r)) for r in range(ep)]
