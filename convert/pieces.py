"""What a plan is made of: output tensors as pieces that tile their bytes, group instances, the plan itself.

- `Copy(key, src, n, dst)`: output bytes `[dst, dst+n)` are source tensor `key`'s bytes `[src, src+n)`;
- `Transform(inputs, chain, select, dst, n)`: output bytes are `chain(inputs)[select]` for one expert, where the
  inputs are byte ranges of source tensors viewed with their shapes (ops only move elements: bit-exact).
Pieces carry their expert index, so expert parallelism can read just one rank's experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .mapping import ExpertGroup, Layout, MoEMapping
from .ops import Chain, Shape
from .safetensors_io import DTYPE_SIZES


@dataclass(frozen=True)
class Copy:
    key: str
    src: int
    n: int
    dst: int
    expert: int | None = None


@dataclass(frozen=True)
class Transform:
    inputs: tuple[tuple[str, int, int, Shape], ...]  # (source key, byte offset, nbytes, shape)
    chain: Chain
    select: int
    itemsize: int
    dst: int
    n: int
    expert: int | None = None


Piece = Copy | Transform


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: Shape
    pieces: list[Piece]
    group: str | None = None  # fused template of the group this tensor belongs to (None: pass-through)
    fused: bool = False  # True when dim 0 is the expert dim of a fused tensor
    sources: tuple[str, ...] = ()  # source keys consumed

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class GroupInstance:
    """One group in one layer: the experts' part keys (per-expert source) or the fused key (fused source)."""

    group: ExpertGroup
    captures: dict[str, str]
    num_experts: int
    part_shapes: list[Shape]
    dtype: str
    parts: dict[int, list[str]] = field(default_factory=dict)  # expert -> part keys (per-expert source)
    fused_key: str | None = None  # fused source


@dataclass
class Plan:
    model_type: str
    mapping: MoEMapping
    source_layout: Layout
    target_layout: Layout
    outputs: list[OutTensor]
    instances: list[GroupInstance]
    passthrough: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs if t.group is not None)
