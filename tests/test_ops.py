"""Every per-expert op and its inverse, bit for bit, on integer views of real dtypes (NaN payloads included)."""

from __future__ import annotations

import pytest
import torch

from automodel_convert.convert.ops import (
    Chain,
    Chunk,
    Concat,
    Deinterleave,
    Interleave,
    Transpose,
    from_bytes,
    to_bytes,
)


def _rand(shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def test_concat_chunk_roundtrip_and_reference():
    a, b = _rand((3, 5)), _rand((4, 5), seed=1)
    op = Concat(0).bind([a.shape, b.shape])
    (c,) = op.apply([a, b])
    assert torch.equal(c, torch.cat([a, b]))
    assert op.out_shapes([a.shape, b.shape]) == [(7, 5)]
    a2, b2 = op.inverse().apply([c])
    assert torch.equal(a2, a) and torch.equal(b2, b)
    assert op.is_byte_concat() and not Concat(1).is_byte_concat()


def test_concat_inverse_needs_recorded_sizes():
    with pytest.raises(ValueError):
        Concat(0).inverse()
    with pytest.raises(ValueError):
        Concat(0).out_shapes([(3, 5), (3, 4)])


def test_chunk_rejects_wrong_sizes():
    with pytest.raises(ValueError):
        Chunk(0, (3, 3)).out_shapes([(7, 5)])


def test_transpose_is_its_own_inverse():
    x = _rand((6, 10))
    (y,) = Transpose(0, 1).apply([x])
    assert torch.equal(y, x.t())
    assert torch.equal(Transpose(0, 1).inverse().apply([y])[0], x)


def test_interleave_matches_reference_and_inverts():
    g, u = _rand((8, 5)), _rand((8, 5), seed=2)
    (y,) = Interleave(1).apply([g, u])
    ref = torch.empty(8, 10, dtype=g.dtype)
    ref[:, 0::2], ref[:, 1::2] = g, u
    assert torch.equal(y, ref)
    g2, u2 = Deinterleave(1).apply([y])
    assert torch.equal(g2, g) and torch.equal(u2, u)
    assert Interleave(1).inverse() == Deinterleave(1) and Deinterleave(1).inverse() == Interleave(1)


def test_chain_transposed_layout_roundtrip():
    gate, up = _rand((24, 40)), _rand((24, 40), seed=3)
    chain = Chain.bind([Concat(0), Transpose(0, 1)], [gate.shape, up.shape])
    (y,) = chain.apply([gate, up])
    assert torch.equal(y, torch.cat([gate, up]).t())
    assert chain.out_shapes([gate.shape, up.shape]) == [(40, 48)]
    back = chain.inverse().apply([y])
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)
    assert not chain.is_byte_concat()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.float64])
def test_integer_views_are_bit_exact(dtype):
    x = _rand((6, 4), torch.float32).to(dtype)
    raw = bytearray(to_bytes(x))
    if dtype.is_floating_point and dtype.itemsize >= 2:
        raw[0:dtype.itemsize] = b"\xff" * dtype.itemsize  # a NaN with a payload: must survive untouched
    view = from_bytes(bytes(raw), (6, 4), dtype.itemsize)
    chain = Chain.bind([Concat(0), Transpose(0, 1)], [(3, 4), (3, 4)])
    parts = chain.inverse().apply(chain.apply([view[:3], view[3:]]))
    assert to_bytes(torch.cat(parts)) == bytes(raw)
