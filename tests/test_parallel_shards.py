"""Shard arithmetic of expert-parallel load/save, without processes: boxes as byte runs, the chunk rule, write
ownership (every byte written exactly once), mesh sizes, read predictions against `inspect`, stale staging clean-up."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from automodel_convert.convert import api
from automodel_convert.convert.errors import ConvertError
from automodel_convert.parallel.load import _want_dtype, predict_read_bytes
from automodel_convert.parallel.mesh import MeshError, mesh_sizes
from automodel_convert.parallel.save import clean_stale_partials
from automodel_convert.parallel.shards import Box, box_runs, chunk_range, intersect, writer_runs

from conftest import FIXTURES


def test_chunk_range_is_torch_chunk():
    for n, parts in itertools.product(range(0, 14), range(1, 6)):
        sizes = [c.numel() for c in torch.arange(n).chunk(parts)] if n else []
        got = [chunk_range(n, parts, i) for i in range(parts)]
        assert [hi - lo for lo, hi in got if hi > lo] == sizes
        assert got[0][0] == 0 and got[-1][1] == n and all(a[1] == b[0] for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("shape", [(5, 4, 3), (7,), (3, 4), (2, 3, 4, 5), ()])
def test_box_runs_are_the_local_tensor(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.int32).reshape(shape)
    flat = x.reshape(-1).view(torch.uint8)
    for _ in range(40):
        off, loc = [], []
        for n in shape:
            a = int(torch.randint(0, n + 1, (), generator=g))
            b = int(torch.randint(a, n + 1, (), generator=g))
            off.append(a)
            loc.append(b - a)
        want = x[tuple(slice(o, o + n) for o, n in zip(off, loc))].contiguous().reshape(-1).view(torch.uint8)
        got = torch.empty_like(want)
        runs = box_runs(Box(shape, tuple(off), tuple(loc)), 4)
        for r in runs:
            got[r.l : r.l + r.n] = flat[r.g : r.g + r.n]
        assert torch.equal(got, want)
        assert [r.g for r in runs] == sorted(r.g for r in runs)
        part = intersect(runs, 8, 40)
        assert all(8 <= r.g and r.g + r.n <= 40 for r in part)


class FakeMesh:
    """The two methods `writer_runs` uses, for a rank at `coord` of a mesh of `shape`."""

    def __init__(self, shape: tuple[int, ...], coord: tuple[int, ...]) -> None:
        self.shape_, self.coord = shape, coord

    def get_coordinate(self) -> list[int]:
        return list(self.coord)

    def size(self, d: int) -> int:
        return self.shape_[d]


@pytest.mark.parametrize("mesh_shape", [(1, 4), (2, 2), (4, 1), (1, 3), (2, 3)])
@pytest.mark.parametrize("inner", ["replicate", "shard1"])
@pytest.mark.parametrize("global_shape", [(6, 4, 3), (7, 5), (2, 3), (5,), ()])
def test_every_byte_is_written_exactly_once(mesh_shape, inner, global_shape):
    """(inner, Shard(0)) on a 2-D mesh like ep_root, uneven sizes included: the writers tile the tensor."""
    from torch.distributed.tensor import Replicate, Shard

    itemsize = 2
    nbytes = max(1, torch.Size(global_shape).numel()) * itemsize if global_shape else itemsize
    count = torch.zeros(nbytes, dtype=torch.int32)
    nd = len(global_shape)
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        off, loc = [0] * nd, list(global_shape)
        placements: list = [Replicate(), Replicate()]
        if nd >= 1:
            lo, hi = chunk_range(global_shape[0], mesh_shape[1], coord[1])
            off[0], loc[0] = lo, hi - lo
            placements[1] = Shard(0)
        if inner == "shard1" and nd >= 2:
            lo, hi = chunk_range(global_shape[1], mesh_shape[0], coord[0])
            off[1], loc[1] = lo, hi - lo
            placements[0] = Shard(1)
        box = Box(tuple(global_shape), tuple(off), tuple(loc))
        held = {(r.g, r.n) for r in box_runs(box, itemsize)}
        for r in writer_runs(box, FakeMesh(mesh_shape, coord), placements, 0, 0, itemsize):
            count[r.g : r.g + r.n] += 1
            # a written run lies inside a held run, at the matching local offset
            assert any(g <= r.g and r.g + r.n <= g + n for g, n in held)
    assert bool((count == 1).all()), count.tolist()


def test_plain_tensor_writers_split_rows():
    box = Box((10, 3), (0, 0), (10, 3))
    rows = [sum(r.n for r in writer_runs(box, None, None, rank, 4, 1)) // 3 for rank in range(4)]
    assert rows == [3, 3, 3, 1]


def test_mesh_sizes():
    assert mesh_sizes(8, 4, 2, None) == (4, 2, 4)  # build_mesh(ep=4, dp_shard=2) on 8 ranks: HSDP 4 x 2, ep 4
    assert mesh_sizes(4, 2, None, None) == (1, 4, 2)
    assert mesh_sizes(6, 3, None, 2) == (2, 3, 3)
    for args, msg in [((4, 3, None, None), "must divide the world size 4"), ((4, 2, 3, None), "dp_shard=3"), ((4, 2, 2, 4), "must equal"), ((4, 0, None, None), "positive")]:
        with pytest.raises(MeshError, match=msg):
            mesh_sizes(*args)


def _available():
    from test_parallel_load_save import available

    return available()


@pytest.mark.parametrize("ep", [1, 2, 3, 4, 5])
def test_prediction_follows_torch_chunk(ep):
    """`predict_read_bytes` (= `inspect --ep`) against torch's own chunk rule on the fused state: a rank reads every
    dense tensor and, of each expert tensor, the rows `torch.arange(E).chunk(ep)` gives it; the ranks' expert shares
    add up to the checkpoint's expert bytes."""
    from automodel_convert.parallel.load import EXPERT, describe

    for fixture in _available():
        _, plan, info = describe(FIXTURES / fixture)
        pred = predict_read_bytes(FIXTURES / fixture, ep)
        want = []
        for r in range(ep):
            total = 0
            for t in plan.outputs:
                spec = info.specs[t.name]
                if spec.kind != EXPERT:
                    total += t.nbytes
                    continue
                chunks = torch.arange(spec.shape[0]).chunk(ep)
                rows = len(chunks[r]) if r < len(chunks) else 0
                total += rows * (t.nbytes // spec.shape[0])
            want.append(total)
        assert pred == want, fixture
        summary = api.inspect(FIXTURES / fixture)
        assert sum(pred) - (ep - 1) * summary["non_expert_bytes"] == summary["total_bytes"], fixture


def test_quantized_tensors_are_never_cast():
    assert _want_dtype("w", torch.bfloat16, torch.float32, None) == torch.float32
    assert _want_dtype("w", torch.float8_e4m3fn, None, torch.bfloat16) == torch.float8_e4m3fn
    assert _want_dtype("b", torch.uint8, None, torch.bfloat16) == torch.uint8
    with pytest.raises(ConvertError, match="never converted"):
        _want_dtype("w", torch.float8_e4m3fn, torch.bfloat16, None)


def test_stale_staging_folders_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".out.partial-{dead_pid}-abcd1234").mkdir()
    (tmp_path / f".out.partial-{os.getpid()}-abcd1234").mkdir()  # a live writer: kept
    (tmp_path / ".other.partial-1-x").mkdir()  # another destination: kept
    removed = clean_stale_partials(tmp_path / "out")
    assert removed == [f".out.partial-{dead_pid}-abcd1234"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".out.partial-{os.getpid()}-abcd1234", ".other.partial-1-x"])
