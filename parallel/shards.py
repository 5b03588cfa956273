"""Which bytes of a global tensor a rank holds, reads and writes: shard boxes as row-major byte runs.

Contract:
- `placements_for(kind, pmesh, ...)` is the one sharding policy of load and save: expert tensors (expert dim 0)
  live on `ep_root` `("ep_dp", "ep")` with `Shard(0)` on "ep" and `Replicate()` (or `Shard(1)`, expert dp
  sharding) on "ep_dp"; dense tensors are `Replicate()` on the 1-D "dp" mesh, or `(Replicate(), Shard(0))` on
  `("dp_replicate", "dp_shard")`. Uneven shards follow DTensor (torch.chunk: the first ranks get ceil(n/k)).
- A `Box` is a rank's local part of a global tensor (offset + local shape, exactly what DTensor computes).
  `box_runs(box)` lists it as `Run(global_off, local_off, n)` byte runs: the local tensor (contiguous, row-major)
  is the concatenation of the runs in order, and each run is one contiguous byte range of the global tensor.
- `writer_box(...)`: the part of a rank's box it is responsible for writing on save. Ranks holding the same bytes
  (Replicate mesh dims) split their common box along dim 0 by the same chunk rule, so across all ranks every byte
  of every tensor is written exactly once, and one dim-0 row (one expert of a fused tensor) by a single rank.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..convert.sharding import chunk_range  # noqa: F401 - the one split rule, re-exported for parallel's callers

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Placement

    from .mesh import ParallelMesh

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Box:
    """A rank's part of a global tensor: `offset[d] : offset[d] + shape[d]` along every dim."""

    global_shape: Shape
    offset: Shape
    shape: Shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Run:
    """Global bytes `[g, g + n)` are local bytes `[l, l + n)`."""

    g: int
    l: int
    n: int


def full_box(shape: Sequence[int]) -> Box:
    shape = tuple(shape)
    return Box(shape, (0,) * len(shape), shape)


def box_runs(box: Box, itemsize: int) -> list[Run]:
    """The box as contiguous runs of the row-major global tensor, in local (row-major) order."""
    shape, off, loc = box.global_shape, box.offset, box.shape
    nd = len(shape)
    if nd == 0:
        return [Run(0, 0, itemsize)]
    if box.numel == 0:
        return []
    # dims after k are covered whole, so one run spans dims k.. of one index of the dims before k
    k = nd - 1
    while k > 0 and off[k] == 0 and loc[k] == shape[k]:
        k -= 1
    strides = [math.prod(shape[d + 1 :]) * itemsize for d in range(nd)]
    run_len = loc[k] * strides[k]
    runs: list[Run] = []
    outer = loc[:k]
    for flat in range(math.prod(outer)):
        g, rem = off[k] * strides[k], flat
        for d in reversed(range(k)):
            g += (off[d] + rem % outer[d]) * strides[d]
            rem //= outer[d]
        runs.append(Run(g, flat * run_len, run_len))
    return runs


def intersect(runs: Sequence[Run], lo: int, hi: int, starts: Sequence[int] | None = None) -> list[Run]:
    """Parts of `runs` (sorted by `g`) inside global bytes `[lo, hi)`."""
    if starts is None:
        starts = [r.g for r in runs]
    out = []
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(runs) and runs[i].g < hi:
        r = runs[i]
        a, b = max(lo, r.g), min(hi, r.g + r.n)
        if a < b:
            out.append(Run(a, r.l + (a - r.g), b - a))
        i += 1
    return out


# ---------------------------------------------------------------- placements


EXPERT, DENSE = "expert", "dense"


def placements_for(kind: str, pmesh: ParallelMesh, ndim: int, dense: str = "replicate", expert_dp: str = "replicate") -> tuple[DeviceMesh, tuple[Placement, ...]]:
    """(mesh, placements) of one tensor: the sharding policy shared by `load_sharded` and `save_sharded`."""
    from torch.distributed.tensor import Replicate, Shard

    if kind == EXPERT:
        inner = Shard(1) if expert_dp == "shard" and ndim >= 2 else Replicate()
        return pmesh.ep_root, (inner, Shard(0))
    if dense == "shard" and ndim >= 1:
        return pmesh.dp_root, (Replicate(), Shard(0))
    return pmesh.dp_mesh, (Replicate(),)


def local_box(global_shape: Sequence[int], mesh: DeviceMesh, placements: Sequence[Placement]) -> Box:
    """This rank's box of a DTensor with these placements (DTensor's own computation)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tuple(global_shape), mesh, list(placements))
    return Box(tuple(global_shape), tuple(offset), tuple(shape))


def writer_runs(box: Box, mesh: DeviceMesh | None, placements: Sequence[Placement] | None, rank: int, world: int, itemsize: int) -> list[Run]:
    """The runs of `box` this rank writes on save, with local offsets into its local tensor.

    Ranks holding the same box (the Replicate mesh dims) split it along dim 0 by the chunk rule; a 0-d tensor is
    written by the first replica. `mesh=None` means a plain (non-DTensor) tensor held whole by all `world` ranks.
    """
    if mesh is None or placements is None:
        replicas, index = world, rank
    else:
        from torch.distributed.tensor import Replicate

        coord = mesh.get_coordinate()
        replicas, index = 1, 0
        for d, p in enumerate(placements):
            if isinstance(p, Replicate):
                index = index * mesh.size(d) + coord[d]
                replicas *= mesh.size(d)
    if replicas == 1:
        return box_runs(box, itemsize)
    if len(box.shape) == 0:
        return box_runs(box, itemsize) if index == 0 else []
    lo, hi = chunk_range(box.shape[0], replicas, index)
    sub = Box(box.global_shape, (box.offset[0] + lo, *box.offset[1:]), (hi - lo, *box.shape[1:]))
    shift = lo * math.prod(box.shape[1:]) * itemsize
    return [Run(r.g, r.l + shift, r.n) for r in box_runs(sub, itemsize)]
