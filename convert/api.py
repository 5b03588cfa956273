"""Python API behind the CLI: merge, split, verify, inspect, and state-dict helpers for the model zoo.

Contract:
- `merge(src, dst)`: any supported checkpoint -> fused layout (`layout="fused"`, transformers v5's in-memory layout,
  or `"transposed"`), key names as transformers v5 holds them. Records the source's shards in the sidecar.
- `split(src, dst)`: any supported checkpoint -> the original layout recorded in its sidecar (shard names, tensor
  order, per-file metadata), or the model type's hub layout when nothing was recorded (or `layout=` to choose).
- `verify(src)`: plans the conversion there and back, streams both one expert at a time and compares every byte,
  dtype, shape, name and shard assignment with the source; nothing is written.
- `inspect(src)`: model type, detected layout, plan summary and, with `ep`, the experts and bytes each rank reads.
All raise `ConvertError` (one line) on bad input; nothing is written on `dry_run`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .engine import (
    FileLayout,
    SourceFiles,
    parse_size,
    restore_layout,
    shard_by_size,
    write_checkpoint,
)
from .errors import ConvertError
from .inspection import inspect, inspect_dry_run, plan_from_index  # noqa: F401 - re-exported
from .mapping import Layout
from .plan import OutTensor, Plan, plan_conversion
from .resolve import file_metadata, layout_arg, open_source, read_sidecar  # noqa: F401 - public
from .safetensors_io import torch_dtype
from .sharding import ep_ranges
from .verify import VerifyResult, verify  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import torch


@dataclass
class ConvertResult:
    command: str
    src: str
    dst: str | None
    model_type: str
    source_layout: Layout
    target_layout: Layout
    tensors_in: int
    tensors_out: int
    files_out: list[str]
    bytes_out: int
    seconds: float
    dry_run: bool
    notes: list[str] = field(default_factory=list)
    plan: Plan | None = None
    file_layout: FileLayout | None = None


def merge(
    src: str | Path,
    dst: str | Path,
    *,
    layout: str | Layout = "fused",
    model_type: str | None = None,
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    workers: int = 4,
    dry_run: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    dequantize: str | None = None,
    force: bool = False,
    source_layout: str | Layout | None = None,
) -> ConvertResult:
    """Convert a checkpoint to the fused (or transposed) layout.

    `dequantize="bf16"` writes block-FP8 and MXFP4 weights dequantized (one expert at a time, see `quant.py`),
    drops their scale tensors and config.json's `quantization_config`; an unquantized checkpoint is refused.
    A checksum of every source tensor is recorded in the sidecar (kept from the source's sidecar when it has one).
    """
    target = layout_arg(layout, (Layout.FUSED, Layout.TRANSPOSED), "--layout")
    given = layout_arg(source_layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--source-layout")
    max_bytes = parse_size(max_shard_size)
    t0 = time.perf_counter()
    ckpt, mapping, mt = open_source(src, revision, model_type)
    plan = plan_conversion(ckpt, mapping, target, naming="model", model_type=mt, source_layout=given)
    sidecar = read_sidecar(ckpt, plan, mt)
    extra_files = None
    record = True
    if (ckpt.sidecar or {}).get("checksums"):
        sidecar["checksums"] = ckpt.sidecar["checksums"]  # they describe the original, not this folder
        record = False
    if dequantize:
        from .quant import dequantize_plan, dequantized_config, is_quantized, target_dtype

        target_dtype(dequantize)
        if not is_quantized(ckpt):
            raise ConvertError(
                f"--dequantize {dequantize}: the checkpoint is not quantized (no quantization_config, no FP8 or MXFP4 tensors); drop --dequantize"
            )
        plan = dequantize_plan(plan, ckpt, dequantize)
        record = False
        sidecar.pop("checksums", None)
        sidecar["dequantized"] = target_dtype(dequantize)
        sidecar["original"] = None  # the quantized shards cannot be restored from dequantized weights
        cfg = dequantized_config(ckpt.config)
        if cfg != ckpt.config and (ckpt.root / "config.json").exists():
            extra_files = {"config.json": (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()}
    file_layout = shard_by_size(plan.outputs, max_bytes, file_metadata(target))
    write = WriteOptions(overwrite, force, workers, sidecar, extra_files, record_checksums=record)
    return _finish("merge", ckpt, plan, file_layout, dst, mt, dry_run, progress, t0, write)


def split(
    src: str | Path,
    dst: str | Path,
    *,
    layout: str | Layout | None = None,
    model_type: str | None = None,
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    workers: int = 4,
    dry_run: bool = False,
    restore: bool = True,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    force: bool = False,
    source_layout: str | Layout | None = None,
) -> ConvertResult:
    """Convert a checkpoint back to its original layout (recorded, or the hub layout of its model type).

    When the original layout is restored and merge recorded checksums, every output tensor is checked against them
    before the destination appears; a mismatch is refused and nothing is written.
    """
    chosen = layout_arg(layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--layout")
    given = layout_arg(source_layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--source-layout")
    max_bytes = parse_size(max_shard_size)
    t0 = time.perf_counter()
    ckpt, mapping, mt = open_source(src, revision, model_type)
    recorded = (ckpt.sidecar or {}).get("original_layout")
    target = chosen or (Layout(recorded) if recorded else mapping.hub_layout)
    plan = plan_conversion(ckpt, mapping, target, naming="disk", model_type=mt, source_layout=given)
    original = (ckpt.sidecar or {}).get("original")
    notes = []
    expected = None
    if restore and original and recorded and Layout(recorded) is target:
        file_layout = restore_layout(plan.outputs, original)
        notes.append("restored the original shard names, tensor order and metadata recorded at merge time")
        expected = (ckpt.sidecar or {}).get("checksums")
        if expected:
            notes.append(f"every tensor matches the {expected['algorithm']} checksum recorded at merge time")
    else:
        file_layout = shard_by_size(plan.outputs, max_bytes, file_metadata(target))
        if original and restore:
            notes.append(
                f"the recorded original layout is {recorded}, not {target}: sharded afresh by --max-shard-size"
            )
    write = WriteOptions(overwrite, force, workers, None, None, expected_checksums=expected)
    res = _finish("split", ckpt, plan, file_layout, dst, mt, dry_run, progress, t0, write)
    res.notes[:0] = notes
    return res


@dataclass
class WriteOptions:
    """How `_finish` writes: destination handling, parallelism, sidecar, extra files and checksums."""

    overwrite: bool = False
    force: bool = False
    workers: int = 4
    sidecar: dict | None = None
    extra_files: dict[str, bytes] | None = None
    record_checksums: bool = False
    expected_checksums: dict | None = None


def _finish(
    cmd: str,
    ckpt: Checkpoint,
    plan: Plan,
    file_layout: FileLayout,
    dst: str | Path,
    mt: str,
    dry_run: bool,
    progress: Callable[[int, int], Callable[[int], None]] | None,
    t0: float,
    write: WriteOptions,
) -> ConvertResult:
    res = ConvertResult(
        cmd,
        str(ckpt.root),
        str(dst),
        mt,
        plan.source_layout,
        plan.target_layout,
        len(ckpt.tensors),
        len(plan.outputs),
        [f.name for f in file_layout.files],
        plan.total_bytes,
        0.0,
        dry_run,
        list(plan.notes),
        plan,
        file_layout,
    )
    if not dry_run:
        cb = progress(plan.total_bytes, len(plan.outputs)) if progress else None
        written = write_checkpoint(
            plan,
            ckpt,
            Path(dst),
            file_layout,
            overwrite=write.overwrite,
            force=write.force,
            workers=write.workers,
            sidecar=write.sidecar,
            extra_files=write.extra_files,
            progress=cb,
            record_checksums=write.record_checksums,
            expected_checksums=write.expected_checksums,
        )
        res.notes.extend(written.notes)
    res.seconds = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------- state dicts for the model zoo


def load_fused_state_dict(
    src: str | Path, *, revision: str | None = None, model_type: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (any supported layout) in transformers v5's naming and fused layout."""
    ckpt, mapping, mt = open_source(src, revision, model_type)
    plan = plan_conversion(ckpt, mapping, Layout.FUSED, naming="model", model_type=mt)
    files = SourceFiles(ckpt)
    out: dict[str, torch.Tensor] = {}
    try:
        from .engine import tensor_from_pieces

        for t in plan.outputs:
            x = tensor_from_pieces(files, t, torch_dtype(t.dtype))
            out[t.name] = x.to(dtype) if dtype is not None and x.is_floating_point() and x.element_size() > 1 else x
    finally:
        files.close()
    return out


__all__ = [
    "ConvertResult",
    "OutTensor",
    "VerifyResult",
    "ep_ranges",
    "inspect",
    "inspect_dry_run",
    "load_fused_state_dict",
    "plan_from_index",
    "merge",
    "split",
    "verify",
]
