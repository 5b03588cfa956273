"""Expert-parallel loading: every rank reads only the bytes it owns, straight into its DTensor shards.

Contract: `load_sharded(src, mesh)` opens a checkpoint (local folder or hub id; per-expert, fused, transposed or
native layout of any registered model type; FP8 scale grids and MXFP4 blocks included) and returns a
`ShardedState`: a dict of every tensor in transformers v5's naming and fused layout (the names and order of
`api.merge`'s output) whose values are DTensors placed by `shards.placements_for`:
- expert tensors (the plan's fused outputs, plus the mapping's `expert_tensors`: biases, MXFP4 blocks/scales):
  `Shard(0)` over the "ep" dim of `mesh.ep_root` (uneven E follows torch.chunk), `Replicate()` over "ep_dp"
  (`expert_dp="shard"`: `Shard(1)` there);
- other tensors: `Replicate()` on `mesh.dp_mesh` (`dense="shard"`: `(Replicate(), Shard(0))` on `mesh.dp_root`).
Each rank reads its shard's bytes only, through the same plan pieces as `api.merge` (a per-expert checkpoint: the
keys of its experts; a fused one: one contiguous `Shard(0)` byte range per tensor), with `pread` into the local
tensor's memory: no rank ever holds a whole fused expert tensor or the whole checkpoint. `state.stats` (LoadStats)
counts the bytes read; with the defaults they equal `api.inspect(src, ep=...)`'s prediction for its ep rank.
`io_threads` threads read in parallel (the first touch of fresh memory is the cost on CPU hosts).
`target` (a state dict, possibly on the meta device, or a module) fixes the names to load, their global shapes
(mismatch: `ConvertError`) and dtypes (floating tensors are cast; a quantized or integer tensor is never cast).
"""

from __future__ import annotations

import bisect
import ctypes
import math
import os
import resource
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..convert.api import open_source, read_sidecar, torch_dtype
from ..convert.checkpoint import Checkpoint
from ..convert.engine import SourceFiles, coalesce_reads, transform_bytes
from ..convert.errors import ConvertError
from ..convert.mapping import Layout, MoEMapping, Template
from ..convert.plan import Copy, OutTensor, Plan, plan_conversion
from ..convert.safetensors_io import DTYPE_SIZES
from ..convert.source import resolve_source
from .shards import DENSE, EXPERT, Box, Run, box_runs, local_box, placements_for

if TYPE_CHECKING:
    import torch

    from .mesh import ParallelMesh


# ---------------------------------------------------------------- what the checkpoint holds


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the fused state: its kind (`expert`: dim 0 is the expert dim, or `dense`), dtype, shape."""

    kind: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]


@dataclass
class SourceInfo:
    """What `save_sharded` needs to know about where a state came from (all header-derived, no data)."""

    root: Path
    model_type: str
    mapping: MoEMapping
    config: dict
    sidecar: dict  # what `api.merge` records for this source (original shards and layout)
    source_layout: Layout
    specs: dict[str, TensorSpec]  # in `api.merge` output order


def expert_templates(mapping: MoEMapping) -> list[Template]:
    return [Template(t) for t in getattr(mapping, "expert_tensors", ())]


def tensor_kind(t: OutTensor, templates: list[Template]) -> str:
    if t.fused or (t.shape and any(tpl.match(t.name) is not None for tpl in templates)):
        return EXPERT
    return DENSE


def describe(src: str | Path, *, model_type: str | None = None, revision: str | None = None) -> tuple[Checkpoint, Plan, SourceInfo]:
    """Open `src` and plan its fused state (model naming): the checkpoint, the plan and the `SourceInfo`."""
    ckpt, mapping, mt = open_source(src, revision, model_type)
    plan = plan_conversion(ckpt, mapping, Layout.FUSED, naming="model", model_type=mt)
    templates = expert_templates(mapping)
    specs = {t.name: TensorSpec(tensor_kind(t, templates), t.dtype, tuple(t.shape)) for t in plan.outputs}
    info = SourceInfo(ckpt.root, mt, mapping, ckpt.config, read_sidecar(ckpt, plan, mt), plan.source_layout, specs)
    return ckpt, plan, info


def predict_read_bytes(src: str | Path, ep: int, *, model_type: str | None = None) -> list[int]:
    """Bytes each ep rank reads under the default placements (experts split, dense tensors replicated): the figure
    `automodel-convert inspect --ep` prints (`convert.inspection.inspect`, one computation for both)."""
    from ..convert.inspection import inspect

    return [r["bytes_read"] for r in inspect(src, model_type=model_type, ep=ep)["ep"]["ranks"]]


# ---------------------------------------------------------------- reading byte runs into memory


def tensor_memory(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (the tensor must outlive the view)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("tensor_memory needs a contiguous CPU tensor")
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


CHUNK = 32 << 20  # reads are split into chunks this large so that `io_threads` can share one big tensor


class RangeReader(SourceFiles):
    """`SourceFiles` that also reads a byte range straight into caller memory (`preadv`, no extra copy)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__(ckpt)
        self._count_lock = threading.Lock()

    def read_into(self, key: str, off: int, dest: memoryview) -> None:
        fd, pos = self.locate(key, off)
        done, n = 0, len(dest)
        while done < n:
            k = os.preadv(fd, [dest[done:]], pos + done)
            if k == 0:
                raise ConvertError(f"{self.ckpt.tensors[key].file}: ended early while reading {key!r}; the shard is truncated, re-download it")
            done += k
        with self._count_lock:
            self.bytes_read += n


def read_runs(files: RangeReader, t: OutTensor, runs: list[Run], dest: memoryview, pool: ThreadPoolExecutor | None = None) -> None:
    """Fill `dest` (the local tensor's bytes) with global bytes `runs` of plan output `t`.

    Copy pieces are read straight into `dest` (in `CHUNK`s, on `pool` when given); a computed piece (transposed
    source, interleave...) reads all of its inputs once and is copied in.
    """
    pieces = coalesce_reads(t.pieces)
    starts = [p.dst for p in pieces]
    cached: tuple[Any, bytes] | None = None
    reads: list[tuple[str, int, memoryview]] = []
    for run in runs:
        pos, end = run.g, run.g + run.n
        i = max(0, bisect.bisect_right(starts, pos) - 1)
        while pos < end:
            p = pieces[i]
            lo, hi = pos - p.dst, min(end, p.dst + p.n) - p.dst
            at = run.l + (pos - run.g)
            if isinstance(p, Copy):
                for a in range(lo, hi, CHUNK):
                    b = min(hi, a + CHUNK)
                    reads.append((p.key, p.src + a, dest[at + a - lo : at + b - lo]))
            else:
                if cached is None or cached[0] is not p:
                    cached = (p, transform_bytes(files.read, p))
                dest[at : at + hi - lo] = cached[1][lo:hi]
            pos = p.dst + hi
            i += 1
    if pool is not None and len(reads) > 1:
        for _ in pool.map(lambda r: files.read_into(*r), reads):
            pass
    else:
        for r in reads:
            files.read_into(*r)


# ---------------------------------------------------------------- the state


@dataclass
class LoadStats:
    """What one rank did. `bytes_read` counts every byte read from the checkpoint's shards."""

    rank: int
    bytes_read: int = 0
    expert_bytes_read: int = 0
    dense_bytes_read: int = 0
    local_bytes: int = 0  # bytes of the local shards held (after any dtype cast)
    tensors: int = 0
    expert_tensors: int = 0
    experts: dict[int, tuple[int, int]] = field(default_factory=dict)  # E -> this rank's [lo, hi) experts
    skipped: list[str] = field(default_factory=list)  # checkpoint tensors not in `target` (strict=False), not read
    seconds: float = 0.0
    peak_rss: int = 0  # ru_maxrss of this process at the end of the load, bytes


class ShardedState(dict):
    """`name -> DTensor` in transformers v5 naming and fused layout, plus `.stats` and `.source` (for saving)."""

    stats: LoadStats
    source: SourceInfo
    placements: dict[str, str]  # policy used: {"dense": ..., "expert_dp": ...}


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))


def _want_dtype(name: str, src: torch.dtype, target: torch.dtype | None, cast: torch.dtype | None) -> torch.dtype:
    if target is not None and target != src:
        if not src.is_floating_point or src.itemsize == 1 or not target.is_floating_point:
            raise ConvertError(
                f"{name!r} is stored as {src} and the target asks for {target}; load_sharded casts floating tensors only (a quantized or integer tensor is never converted: dequantize it in the model)"
            )
        return target
    if target is None and cast is not None and src.is_floating_point and src.itemsize > 1:
        return cast
    return src


def load_sharded(
    src: str | Path,
    mesh: ParallelMesh,
    *,
    model_type: str | None = None,
    revision: str | None = None,
    dense: str = "replicate",
    expert_dp: str = "replicate",
    target: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    io_threads: int = 2,
) -> ShardedState:
    """Load this rank's shards of `src` (see the module docstring). Collective: call it on every rank."""
    import torch

    if dense not in ("replicate", "shard") or expert_dp not in ("replicate", "shard"):
        raise ValueError(f"dense={dense!r} and expert_dp={expert_dp!r} must each be 'replicate' or 'shard'")
    t0 = time.perf_counter()
    ckpt, plan, info = describe(_resolve_on_rank0_first(src, revision, mesh), model_type=model_type)
    wanted = None if target is None else dict(target.state_dict() if isinstance(target, torch.nn.Module) else target)
    if wanted is not None:
        _check_target(wanted, info, strict)
    stats = LoadStats(rank=mesh.rank)
    state = ShardedState()
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    files = RangeReader(ckpt)
    pool = ThreadPoolExecutor(io_threads) if io_threads > 1 else None
    try:
        for t in plan.outputs:
            if wanted is not None and t.name not in wanted:
                stats.skipped.append(t.name)
                continue
            want = wanted[t.name].dtype if wanted is not None else None
            state[t.name] = _load_one(t, info.specs[t.name], mesh, (dense, expert_dp), files, pool, (want, dtype), device, stats)
    finally:
        if pool is not None:
            pool.shutdown()
        stats.bytes_read = files.bytes_read
        files.close()
    stats.seconds = time.perf_counter() - t0
    stats.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state.stats, state.source, state.placements = stats, info, {"dense": dense, "expert_dp": expert_dp}
    return state


def _resolve_on_rank0_first(src: str | Path, revision: str | None, mesh: ParallelMesh) -> Path:
    """The local folder of `src`; for a hub id rank 0 downloads first and the others then find it in the cache."""
    import torch.distributed as dist

    if not Path(str(src)).expanduser().exists():
        if mesh.rank == 0:
            resolve_source(str(src), revision)
        dist.barrier()
    return resolve_source(str(src), revision)


def _check_target(wanted: dict[str, torch.Tensor], info: SourceInfo, strict: bool) -> None:
    """The target's names and shapes against the checkpoint's fused state (one line on a mismatch)."""
    missing = [n for n in wanted if n not in info.specs]
    unexpected = [n for n in info.specs if n not in wanted]
    if strict and (missing or unexpected):
        what = f"{len(missing)} target tensors are not in the checkpoint (e.g. {missing[:2]})" if missing else ""
        what += ("; " if what else "") + (f"{len(unexpected)} checkpoint tensors are not in the target (e.g. {unexpected[:2]})" if unexpected else "")
        raise ConvertError(f"{what}; pass strict=False to load the common tensors")
    for n, t in wanted.items():
        if n in info.specs and tuple(t.shape) != info.specs[n].shape:
            raise ConvertError(f"{n!r}: the checkpoint holds {list(info.specs[n].shape)} but the target expects {list(t.shape)}")


def _load_one(t, spec: TensorSpec, mesh: ParallelMesh, placement: tuple[str, str], files: RangeReader, pool,  # noqa: ANN001
              dtypes: tuple, device: torch.device, stats: LoadStats) -> torch.Tensor:
    """One output tensor: read this rank's box of it, cast (`dtypes` = (target's, requested)), move, wrap as a
    DTensor; the bytes read are counted in `stats`."""
    import torch
    from torch.distributed.tensor import DTensor

    dmesh, placements = placements_for(spec.kind, mesh, len(spec.shape), *placement)
    box: Box = local_box(spec.shape, dmesh, placements)
    src_dtype = torch_dtype(t.dtype)
    local = torch.empty(box.shape, dtype=src_dtype)
    before = files.bytes_read
    read_runs(files, t, box_runs(box, DTYPE_SIZES[t.dtype]), tensor_memory(local), pool)
    got = files.bytes_read - before
    if spec.kind == EXPERT:
        stats.expert_bytes_read += got
        stats.expert_tensors += 1
        stats.experts[spec.shape[0]] = (box.offset[0], box.offset[0] + box.shape[0])
    else:
        stats.dense_bytes_read += got
    want = _want_dtype(t.name, src_dtype, *dtypes)
    if want != src_dtype:
        local = local.to(want)
    if device.type != "cpu":
        local = local.to(device)
    stats.local_bytes += local.numel() * local.element_size()
    stats.tensors += 1
    return DTensor.from_local(local, dmesh, placements, run_check=False, shape=torch.Size(spec.shape), stride=_contiguous_stride(spec.shape))
