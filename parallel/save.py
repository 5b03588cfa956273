"""Expert-parallel saving: every rank writes the bytes it holds into one planned checkpoint, published atomically.

Contract: `save_sharded(state, dst, mesh, layout=...)` is collective (call it on every rank) and writes a standard
HF checkpoint equal, tensor for tensor and byte for byte, to what the single-process converter writes:
- `layout="fused"`: `api.merge(src, dst)` (transformers v5 naming and fused layout, `max_shard_size` shards, the
  sidecar recording the original shards);
- `layout="original"`: `api.split(merge(src))`, i.e. the source's own shards restored (names, tensor order,
  per-file metadata, index or not): bit for bit the source checkpoint when the state is unchanged.
How: every rank plans the same files from headers alone (the planner of `convert/`, on a virtual checkpoint of
the state's names, dtypes and global shapes). Rank 0 creates the staging folder with `engine.atomic_folder`
(`.<dst>.partial-<pid>-<hex>`), writes every header and sizes every file with `ftruncate`, copies the non-weight
files; after a broadcast every rank `pwrite`s the plan pieces whose bytes it is responsible for
(`shards.writer_runs`: every byte exactly once, no gather of experts; only a tensor that is also sharded along a
non-expert dim (`expert_dp="shard"`) AND whose target layout computes experts (transposed, interleaved) is first
gathered along that dim before the writes); the ranks then exchange their status and
byte counts; rank 0 checks that they add up, writes the index last and renames the staging folder into place.
A rank that fails or dies mid-save leaves no `dst` (the staging folder is removed by rank 0, or, if rank 0
died, left as `.<dst>.partial-<pid>-*` without an index and removed by the next save once that pid is gone).
The state may be a `ShardedState` from `load_sharded` or any `name -> DTensor | Tensor` dict given `source=`
(the checkpoint folder it came from: config, non-weight files and original shard layout); `config=` replaces the
copied `config.json`. The parent of `dst` must exist; `overwrite=True` replaces an existing `dst` atomically.
Local shards are staged on the host (a CUDA state is copied to CPU memory, all of this rank's share at once).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..convert.api import file_metadata
from ..convert.checkpoint import INDEX_NAME, SIDECAR_NAME
from ..convert.engine import (
    FileLayout,
    atomic_folder,
    copy_extra_files,
    parse_size,
    render_index,
    restore_layout,
    shard_by_size,
    transform_bytes,
)
from ..convert.errors import ConvertError
from ..convert.mapping import Layout
from ..convert.plan import Copy, Plan, plan_conversion
from ..convert.safetensors_io import encode_header, safetensors_dtype
from ..convert.state import virtual_checkpoint
from .load import ShardedState, SourceInfo, TensorSpec, describe, tensor_memory
from .shards import Box, Run, box_runs, full_box, intersect, local_box, writer_runs

if TYPE_CHECKING:
    import torch

    from .mesh import ParallelMesh

# Test hook: called as `_fault_hook(stage, rank)` at "written" (after this rank's first piece) and "gathered".
_fault_hook: Callable[[str, int], None] | None = None



@dataclass
class SaveResult:
    dst: str
    layout: str
    files: list[str]
    bytes_written: int  # by this rank
    total_bytes: int  # tensor bytes of the whole checkpoint
    seconds: float


@dataclass
class _Local:
    """One state tensor as this rank holds it: local bytes, its box, and the runs it writes."""

    tensor: torch.Tensor  # contiguous CPU local tensor (kept alive for `mem`)
    mem: memoryview
    box: Box
    held: list[Run]
    held_starts: list[int]
    writes: list[Run]
    write_starts: list[int]

    def read(self, off: int, n: int) -> bytes:
        """Global bytes `[off, off+n)`, which this rank must hold."""
        parts = intersect(self.held, off, off + n, self.held_starts)
        if sum(r.n for r in parts) != n:
            raise ConvertError("internal error: a computed piece needs bytes this rank does not hold; save with expert_dp='replicate'")
        return b"".join(bytes(self.mem[r.l : r.l + r.n]) for r in parts)


def _dtype_name(t: torch.Tensor) -> str:
    name = safetensors_dtype(t.dtype)
    if name is None:
        raise ConvertError(f"dtype {t.dtype} cannot be stored in safetensors")
    return name


def _local_view(name: str, value: torch.Tensor, rank: int, world: int, whole_rows: bool) -> _Local:
    """This rank's bytes of one state tensor. `whole_rows`: a computed output piece needs whole dim-0 rows (whole
    experts), so a tensor also sharded along another dim is first gathered along it (collective, same order on
    every rank)."""
    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard

    itemsize = value.element_size()
    if isinstance(value, DTensor):
        if any(type(p) not in (Shard, Replicate) for p in value.placements):
            raise ConvertError(f"{name!r} has placements {value.placements}; save_sharded handles Shard and Replicate (redistribute the tensor first)")
        if whole_rows and any(isinstance(p, Shard) and p.dim != 0 for p in value.placements):
            value = value.redistribute(value.device_mesh, [Replicate() if isinstance(p, Shard) and p.dim != 0 else p for p in value.placements])
        mesh, placements = value.device_mesh, value.placements
        local = value.to_local()
        box = local_box(tuple(value.shape), mesh, placements)
    else:
        mesh, placements, local = None, None, value
        box = full_box(tuple(value.shape))
    if tuple(local.shape) != box.shape:
        raise ConvertError(f"a local shard has shape {list(local.shape)}, not the {list(box.shape)} its placements give")
    local = local.detach().to("cpu").contiguous()
    if local.dim() == 0:
        local = local.reshape(1)
    local = local.view(torch.uint8) if local.numel() else local
    held = box_runs(box, itemsize)
    writes = writer_runs(box, mesh, placements, rank, world, itemsize)
    return _Local(local, tensor_memory(local), box, held, [r.g for r in held], writes, [r.g for r in writes])


def plan_output(info: SourceInfo, specs: dict[str, TensorSpec], layout: str, max_shard_size: str | int) -> tuple[Plan, FileLayout, dict | None]:
    """The files `api.merge` (fused) or `api.split` of the merge (original) would write for this state, planned from
    its virtual checkpoint (`convert.state`: the one way a state dict is saved, here for every rank at once)."""
    virtual = virtual_checkpoint(info.root, {n: (s.dtype, s.shape) for n, s in specs.items()}, info.config, info.sidecar)
    if layout == "fused":
        plan = plan_conversion(virtual, info.mapping, Layout.FUSED, naming="model", model_type=info.model_type)
        return plan, shard_by_size(plan.outputs, parse_size(max_shard_size), file_metadata(Layout.FUSED)), info.sidecar
    if layout == "original":
        target = Layout(info.sidecar["original_layout"])
        plan = plan_conversion(virtual, info.mapping, target, naming="disk", model_type=info.model_type)
        return plan, restore_layout(plan.outputs, info.sidecar["original"]), None
    raise ConvertError(f"layout {layout!r} is not 'original' or 'fused'")


def clean_stale_partials(dst: Path) -> list[str]:
    """Remove `.<dst>.partial-<pid>-*` staging folders whose writer process no longer exists on this host."""
    removed = []
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        return removed
    prefix = f".{dst.name}.partial-"
    for p in parent.iterdir():
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        try:
            pid = int(p.name[len(prefix) :].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # still running (another save in progress)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def _write_my_pieces(staging: Path, layout: FileLayout, locals_: dict[str, _Local], rank: int) -> int:
    """`pwrite` every piece byte this rank is responsible for; returns the bytes written."""
    written = 0
    hooked = False
    for of in layout.files:
        header, offsets = encode_header([(t.name, t.dtype, t.shape) for t in of.tensors], of.metadata)
        fd = os.open(staging / of.name, os.O_WRONLY)
        try:
            for t, off in zip(of.tensors, offsets):
                base = len(header) + off
                for p in t.pieces:
                    if isinstance(p, Copy):
                        loc = locals_[p.key]
                        for r in intersect(loc.writes, p.src, p.src + p.n, loc.write_starts):
                            _pwrite(fd, loc.mem[r.l : r.l + r.n], base + p.dst + (r.g - p.src))
                            written += r.n
                    else:  # computed from one expert: written by the rank that writes the first input byte
                        key, in_off, _, _ = p.inputs[0]
                        loc = locals_[key]
                        if not intersect(loc.writes, in_off, in_off + 1, loc.write_starts):
                            continue
                        data = transform_bytes(lambda k, o, n: locals_[k].read(o, n), p)
                        _pwrite(fd, memoryview(data), base + p.dst)
                        written += p.n
                    if written and not hooked and _fault_hook is not None:
                        hooked = True
                        _fault_hook("written", rank)
        finally:
            os.close(fd)
    return written


def _pwrite(fd: int, data: memoryview, off: int) -> None:
    while len(data):
        k = os.pwrite(fd, data, off)
        data, off = data[k:], off + k


def save_sharded(
    state: Mapping[str, torch.Tensor],
    dst: str | Path,
    mesh: ParallelMesh,
    *,
    layout: str = "original",
    source: str | Path | None = None,
    model_type: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    config: dict | None = None,
) -> SaveResult:
    """Write `state` as a checkpoint at `dst` from all ranks at once (see the module docstring)."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    dst = Path(dst)
    rank, world = dist.get_rank(), dist.get_world_size()
    info = _source_info(state, source, model_type)
    specs = {n: TensorSpec(s.kind, _dtype_name(state[n]), tuple(state[n].shape)) for n, s in info.specs.items()}
    plan, file_layout, sidecar = plan_output(info, specs, layout, max_shard_size)
    computed_from = {k for t in plan.outputs for p in t.pieces if not isinstance(p, Copy) for k, *_ in p.inputs}
    total = sum(of.nbytes for of in file_layout.files)
    locals_ = _local_views(state, specs, computed_from, rank, world)
    cm, staging = _open_staging(dst, overwrite, info.root, file_layout, config, rank)  # A: rank 0 creates, all learn
    try:
        # B: every rank writes its bytes; statuses and byte counts are exchanged
        error, written = None, 0
        try:
            written = _write_my_pieces(staging, file_layout, locals_, rank)
        except Exception as e:  # noqa: BLE001 - reported to every rank
            error = f"rank {rank}: {e}"
        statuses: list = [None] * world
        dist.all_gather_object(statuses, (error, written))
        if _fault_hook is not None:
            _fault_hook("gathered", rank)
        # C: rank 0 checks, writes the index last and publishes the folder (`cm` is closed either way)
        outcome = "ok"
        if rank == 0:
            cm, outcome = None, _publish(cm, staging, file_layout, sidecar, total, statuses)
        outcome = _bcast(outcome)
    except BaseException as e:  # a collective failed (a rank died): never publish, remove the staging folder
        if cm is not None:
            cm.__exit__(type(e), e, e.__traceback__)
        raise
    if outcome != "ok":
        raise ConvertError(outcome[1:])
    return SaveResult(str(dst), layout, [of.name for of in file_layout.files], written, total, time.perf_counter() - t0)


def _bcast(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _source_info(state: Mapping[str, torch.Tensor], source: str | Path | None, model_type: str | None) -> SourceInfo:
    """The fused state's description (from a `ShardedState`, or by planning `source`), checked against `state`."""
    if isinstance(state, ShardedState) and source is None:
        info = state.source
    elif source is not None:
        info = describe(source, model_type=model_type)[2]
    else:
        raise ConvertError("save_sharded needs source= (the checkpoint folder the state came from) for a plain state dict")
    missing = [n for n in info.specs if n not in state]
    extra = [n for n in state if n not in info.specs]
    if missing or extra:
        raise ConvertError(f"the state does not match its source checkpoint: missing {missing[:2]}, unexpected {extra[:2]}")
    return info


def _local_views(state: Mapping[str, torch.Tensor], specs: dict, computed_from: set, rank: int, world: int) -> dict:
    """This rank's local bytes of every tensor; a problem on one rank stops every rank (collective), none waits."""
    import torch.distributed as dist

    prep_error, locals_ = None, {}
    try:
        locals_ = {n: _local_view(n, state[n], rank, world, n in computed_from) for n in specs}
    except ConvertError as e:
        prep_error = f"rank {rank}: {e}"
    prep: list = [None] * world
    dist.all_gather_object(prep, prep_error)
    if any(prep):
        raise ConvertError(next(e for e in prep if e))
    return locals_


def _open_staging(dst: Path, overwrite: bool, root: Path, file_layout: FileLayout, config: dict | None, rank: int):  # noqa: ANN202
    """Rank 0 creates the staging folder with every file's header and size; every rank learns its path (collective).
    Returns (rank 0's open `atomic_folder` context or None, the staging folder)."""
    cm = atomic_folder(dst, overwrite) if rank == 0 else None
    msg = None
    if rank == 0:
        try:
            clean_stale_partials(dst)
            staging = cm.__enter__()
        except Exception as e:  # noqa: BLE001 - sent to every rank
            cm, msg = None, f"!{e}"
        else:
            try:
                _create_files(root, staging, file_layout, config)
                msg = str(staging)
            except BaseException as e:
                cm.__exit__(type(e), e, e.__traceback__)
                cm, msg = None, f"!cannot create the output files in {str(dst.parent)!r}: {e}"
    msg = _bcast(msg)
    if msg.startswith("!"):
        raise ConvertError(msg[1:])
    return cm, Path(msg)


def _publish(cm, staging: Path, file_layout: FileLayout, sidecar: dict, total: int, statuses: list) -> str:  # noqa: ANN001
    """Rank 0: check every rank's status and byte count, write the index and publish (close `cm`), or discard the
    staging folder; "ok" or "!<one line>"."""
    errors = [s[0] for s in statuses if s[0]]
    done = sum(s[1] for s in statuses)
    try:
        if errors:
            raise ConvertError(f"save_sharded failed on {errors[0]}")
        if done != total:
            raise ConvertError(f"internal error: the ranks wrote {done} of {total} tensor bytes")
        _finish(staging, file_layout, sidecar, total)
    except BaseException as e:
        cm.__exit__(type(e), e, e.__traceback__)
        return f"!{e}"
    cm.__exit__(None, None, None)
    return "ok"


def _create_files(root: Path, staging: Path, layout: FileLayout, config: dict | None) -> None:
    copy_extra_files(root, staging)
    if config is not None:
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for of in layout.files:
        header, _ = encode_header([(t.name, t.dtype, t.shape) for t in of.tensors], of.metadata)
        fd = os.open(staging / of.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + of.nbytes)
        finally:
            os.close(fd)


def _finish(staging: Path, layout: FileLayout, sidecar: dict | None, total: int) -> None:
    """The sidecar and, last, the index (what makes a folder look like a complete checkpoint)."""
    if sidecar is not None:
        (staging / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=1) + "\n")
    if layout.write_index:
        (staging / INDEX_NAME).write_text(render_index(layout, total), encoding="utf-8")
