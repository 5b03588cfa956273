"""Per-expert tensor ops, each with an exact inverse.

Contract: an op maps a LIST of per-expert tensors to another list (one expert at a time; the expert dimension is
never materialised here). `op.inverse()` returns the op that maps the outputs back to the inputs bit for bit, and
`op.out_shapes(shapes)` gives output shapes from input shapes without touching data. Ops only move elements
(concatenate, chunk, transpose, interleave), so applying them to integer views of any dtype is bit-exact.

Stacking the experts along a new dim 0 (and unstacking) is not an op here: the planner places expert `e`'s bytes
at `e * expert_nbytes` of the fused tensor, which is exactly `torch.stack` of row-major tensors.

Ops:
- `Concat(dim)`        many -> one: `torch.cat(xs, dim)`;        inverse `Chunk(dim, sizes)` with the recorded sizes.
- `Chunk(dim, sizes)`  one -> many: `torch.split(x, sizes, dim)`; inverse `Concat(dim)`.
- `Transpose(a, b)`    each tensor transposed;                     inverse itself.
- `Interleave(dim)`    two -> one, `out[..., 0::2] = x0`, `out[..., 1::2] = x1` along `dim`; inverse `Deinterleave`.
- `Deinterleave(dim)`  one -> two;                                 inverse `Interleave(dim)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: byte-range conversions never need it (small, fast CLI)
    import torch

Shape = tuple[int, ...]


class Op:
    """Base class: a bijection on lists of per-expert tensors."""

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def inverse(self) -> Op:
        raise NotImplementedError

    def out_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        raise NotImplementedError

    def is_byte_concat(self) -> bool:
        """True when the op only concatenates/splits whole row-major blocks (outputs are byte ranges of inputs)."""
        return False


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


@dataclass(frozen=True)
class Concat(Op):
    dim: int
    sizes: tuple[int, ...] | None = None  # filled in by `bind` from the input shapes; needed for the inverse

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        return [torch.cat(list(xs), dim=self.dim)]

    def bind(self, shapes: Sequence[Shape]) -> Concat:
        d = _norm(self.dim, len(shapes[0]))
        return Concat(self.dim, tuple(s[d] for s in shapes))

    def inverse(self) -> Op:
        if self.sizes is None:
            raise ValueError("Concat.inverse needs the recorded sizes: call bind(shapes) first")
        return Chunk(self.dim, self.sizes)

    def out_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        first = shapes[0]
        d = _norm(self.dim, len(first))
        for s in shapes[1:]:
            if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != d):
                raise ValueError(f"cannot concatenate shapes {list(shapes)} along dim {self.dim}")
        return [tuple(sum(s[d] for s in shapes) if i == d else n for i, n in enumerate(first))]

    def is_byte_concat(self) -> bool:
        return self.dim == 0


@dataclass(frozen=True)
class Chunk(Op):
    dim: int
    sizes: tuple[int, ...]

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        (x,) = xs
        return list(x.split(list(self.sizes), dim=self.dim))

    def inverse(self) -> Op:
        return Concat(self.dim, self.sizes)

    def out_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        (s,) = shapes
        d = _norm(self.dim, len(s))
        if sum(self.sizes) != s[d]:
            raise ValueError(f"cannot chunk dim {self.dim} of {list(s)} into sizes {list(self.sizes)}")
        return [tuple(n if i == d else m for i, m in enumerate(s)) for n in self.sizes]

    def is_byte_concat(self) -> bool:
        return self.dim == 0


@dataclass(frozen=True)
class Transpose(Op):
    dim0: int = 0
    dim1: int = 1

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [x.transpose(self.dim0, self.dim1).contiguous() for x in xs]

    def inverse(self) -> Op:
        return self

    def out_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        out = []
        for s in shapes:
            t = list(s)
            a, b = _norm(self.dim0, len(s)), _norm(self.dim1, len(s))
            t[a], t[b] = t[b], t[a]
            out.append(tuple(t))
        return out


@dataclass(frozen=True)
class Interleave(Op):
    dim: int

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        a, b = xs
        d = _norm(self.dim, a.dim())
        return [torch.stack([a, b], dim=d + 1).flatten(d, d + 1)]

    def inverse(self) -> Op:
        return Deinterleave(self.dim)

    def out_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        a, b = shapes
        if a != b:
            raise ValueError(f"cannot interleave different shapes {list(a)} and {list(b)}")
        d = _norm(self.dim, len(a))
        return [tuple(2 * n if i == d else n for i, n in enumerate(a))]


@dataclass(frozen=True)
class Deinterleave(Op):
    dim: int

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        (x,) = xs
        d = _norm(self.dim, x.dim())
        idx = [slice(None)] * x.dim()
        idx[d] = slice(0, None, 2)
        even = x[tuple(idx)].contiguous()
        idx[d] = slice(1, None, 2)
        return [even, x[tuple(idx)].contiguous()]

    def inverse(self) -> Op:
        return Interleave(self.dim)

    def out_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        (s,) = shapes
        d = _norm(self.dim, len(s))
        if s[d] % 2:
            raise ValueError(f"cannot de-interleave odd dim {self.dim} of {list(s)}")
        half = tuple(n // 2 if i == d else n for i, n in enumerate(s))
        return [half, half]


@dataclass(frozen=True)
class Chain:
    """A sequence of ops bound to concrete input shapes; `inverse()` is the reversed chain of inverses."""

    ops: tuple[Op, ...]

    @staticmethod
    def bind(ops: Sequence[Op], shapes: Sequence[Shape]) -> Chain:
        bound: list[Op] = []
        cur = list(shapes)
        for op in ops:
            if isinstance(op, Concat):
                op = op.bind(cur)
            cur = op.out_shapes(cur)
            bound.append(op)
        return Chain(tuple(bound))

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = list(xs)
        for op in self.ops:
            out = op.apply(out)
        return out

    def out_shapes(self, shapes: Sequence[Shape]) -> list[Shape]:
        cur = list(shapes)
        for op in self.ops:
            cur = op.out_shapes(cur)
        return cur

    def inverse(self) -> Chain:
        return Chain(tuple(op.inverse() for op in reversed(self.ops)))

    def then(self, other: Chain) -> Chain:
        return Chain(self.ops + other.ops)

    def is_byte_concat(self) -> bool:
        return all(op.is_byte_concat() for op in self.ops)


def int_view_dtype(itemsize: int) -> torch.dtype:
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]


def from_bytes(buf: bytes | bytearray | memoryview, shape: Shape, itemsize: int) -> torch.Tensor:
    """A tensor viewing raw little-endian bytes as integers of `itemsize` (bit-exact for every dtype)."""
    import torch

    if len(buf) == 0:
        return torch.empty(shape, dtype=int_view_dtype(itemsize))
    return torch.frombuffer(bytearray(buf) if isinstance(buf, bytes) else buf, dtype=int_view_dtype(itemsize)).reshape(shape)


def to_bytes(t: torch.Tensor) -> bytes:
    import torch

    return t.contiguous().view(torch.uint8).numpy().tobytes()
