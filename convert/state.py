"""Saving a state dict through the planner: one way, for the zoo's `save_pretrained` and for expert-parallel saves.

Contract:
- `virtual_checkpoint(root, specs, config, sidecar)`: a state (`name -> (safetensors dtype, shape)`, transformers
  v5's in-memory naming and fused layout) as a checkpoint that exists only as a plan source: one virtual file in
  the given order, `root` standing for the folder the state came from. `plan_conversion` plans from it exactly as
  from a fused checkpoint on disk (`parallel/save.plan_output` plans every rank's files from it).
- `save_state_dict(tensors, dst, model_type=..., layout=...)`: one process writes a state dict of CPU tensors as a
  checkpoint through `plan_conversion` and the streaming engine (`engine.write_checkpoint` with the tensors'
  memory as the source): the bytes go from the tensors to the output shards once, atomically, fsynced.
  `layout="original"`: the type's hub layout and key names; `"fused"`: the fused layout with hub key names (what
  `split --layout fused` writes). Shards by `max_shard_size`, an index always, no sidecar. `extra_files` (name ->
  bytes, e.g. config.json) are written beside them.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .engine import MemorySource, WriteResult, parse_size, shard_by_size, write_checkpoint
from .errors import ConvertError
from .mapping import Layout
from .plan import plan_conversion
from .registry import get_mapping
from .resolve import file_metadata
from .safetensors_io import DTYPE_SIZES, FileHeader, TensorInfo, safetensors_dtype

if TYPE_CHECKING:
    import torch

STATE_FILE = "<state>"


def virtual_checkpoint(
    root: Path, specs: Mapping[str, tuple[str, tuple[int, ...]]], config: dict, sidecar: dict | None = None
) -> Checkpoint:
    """The state as a checkpoint that exists only as a plan source (one virtual file, in `specs` order)."""
    tensors, infos, pos = {}, [], 0
    for name, (dtype, shape) in specs.items():
        nbytes = DTYPE_SIZES[dtype] * math.prod(shape)
        t = TensorInfo(name, dtype, tuple(shape), STATE_FILE, pos, nbytes)
        tensors[name] = t
        infos.append(t)
        pos += nbytes
    header = FileHeader(STATE_FILE, tuple(infos), file_metadata(Layout.FUSED), 0, pos)
    return Checkpoint(Path(root), {STATE_FILE: header}, tensors, config, {}, sidecar)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (the tensor must outlive the view)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ConvertError("save_state_dict needs contiguous CPU tensors")
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def save_state_dict(
    tensors: Mapping[str, torch.Tensor],
    dst: str | Path,
    *,
    model_type: str,
    config: dict | None = None,
    layout: str = "original",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
    workers: int = 4,
) -> WriteResult:
    """Write `tensors` (transformers v5 names, fused layout, contiguous CPU) as a checkpoint at `dst` (see the
    module docstring)."""
    if layout not in ("original", "fused"):
        raise ConvertError(f"layout must be 'original' or 'fused', not {layout!r}")
    specs = {}
    for name, t in tensors.items():
        dtype = safetensors_dtype(t.dtype)
        if dtype is None:
            raise ConvertError(f"{name!r} has dtype {t.dtype}, which safetensors cannot store")
        specs[name] = (dtype, tuple(t.shape))
    mapping = get_mapping(model_type)
    ckpt = virtual_checkpoint(Path(dst).parent, dict(sorted(specs.items())), config or {"model_type": model_type})
    target = mapping.hub_layout if layout == "original" else Layout.FUSED
    plan = plan_conversion(ckpt, mapping, target, naming="disk", model_type=model_type)
    file_layout = shard_by_size(plan.outputs, parse_size(max_shard_size), file_metadata(target))
    source = MemorySource({name: tensor_bytes(t) for name, t in tensors.items()})
    return write_checkpoint(
        plan, ckpt, Path(dst), file_layout, overwrite=overwrite, workers=workers, extra_files=extra_files, source=source
    )
