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

import bisect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from .checkpoint import INDEX_NAME, Checkpoint, _load_json, open_checkpoint
from .checksums import new_hasher
from .engine import (
    FileLayout,
    SourceFiles,
    parse_size,
    piece_bytes,
    record_original,
    restore_layout,
    shard_by_size,
    write_checkpoint,
)
from .errors import ConvertError
from .mapping import Layout, MoEMapping, Template
from .plan import LAYOUT_METADATA_KEY, Copy, OutTensor, Plan, Transform, key_coverage, plan_conversion
from .registry import get_mapping
from .safetensors_io import DTYPE_SIZES, FileHeader, TensorInfo
from .source import resolve_source

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    import torch

    table = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": torch.uint16,
        "I32": torch.int32,
        "U32": torch.uint32,
        "I64": torch.int64,
        "U64": torch.uint64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", torch.uint8),
    }
    return table[name]


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


def _open(src: str | Path, revision: str | None, model_type: str | None) -> tuple[Checkpoint, MoEMapping, str]:
    folder = resolve_source(str(src), revision)
    ckpt = open_checkpoint(folder, require_config=model_type is None)
    mt = model_type or (ckpt.sidecar or {}).get("model_type") or ckpt.config.get("model_type")  # merge's --model-type
    if not isinstance(mt, str) or not mt:
        raise ConvertError(f"{folder / 'config.json'} has no model_type; pass --model-type")
    return ckpt, get_mapping(mt), mt


def _layout_arg(layout: str | Layout | None, allowed: tuple[Layout, ...], option: str) -> Layout | None:
    if layout is None or isinstance(layout, Layout):
        return layout
    names = {
        "hf": Layout.FUSED,
        "fused": Layout.FUSED,
        "transposed": Layout.TRANSPOSED,
        "per_expert": Layout.PER_EXPERT,
        "per-expert": Layout.PER_EXPERT,
    }
    if layout not in names or names[layout] not in allowed:
        raise ConvertError(f"{option} {layout!r} is not one of {', '.join(str(a) for a in allowed)}")
    return names[layout]


def _file_metadata(layout: Layout) -> dict[str, str]:
    meta = {"format": "pt"}
    if layout is Layout.TRANSPOSED:
        meta[LAYOUT_METADATA_KEY] = str(layout)
    return meta


def _sidecar(ckpt: Checkpoint, plan: Plan, mt: str) -> dict:
    original = (ckpt.sidecar or {}).get("original") or record_original(ckpt)
    source_layout = (ckpt.sidecar or {}).get("original_layout") or str(plan.source_layout)
    return {
        "tool": "automodel-convert",
        "version": __version__,
        "model_type": mt,
        "layout": str(plan.target_layout),
        "original_layout": source_layout,
        "parts": {
            gi.group.fused_template.format(**gi.captures): [list(s) for s in gi.part_shapes] for gi in plan.instances
        },
        "original": original,
    }


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
    target = _layout_arg(layout, (Layout.FUSED, Layout.TRANSPOSED), "--layout")
    given = _layout_arg(source_layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--source-layout")
    max_bytes = parse_size(max_shard_size)
    t0 = time.perf_counter()
    ckpt, mapping, mt = _open(src, revision, model_type)
    plan = plan_conversion(ckpt, mapping, target, naming="model", model_type=mt, source_layout=given)
    sidecar = _sidecar(ckpt, plan, mt)
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
    file_layout = shard_by_size(plan.outputs, max_bytes, _file_metadata(target))
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
    chosen = _layout_arg(layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--layout")
    given = _layout_arg(source_layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--source-layout")
    max_bytes = parse_size(max_shard_size)
    t0 = time.perf_counter()
    ckpt, mapping, mt = _open(src, revision, model_type)
    recorded = (ckpt.sidecar or {}).get("original_layout")
    target = chosen or (
        Layout(recorded)
        if recorded
        else (Layout.PER_EXPERT if mapping.groups and mapping.disk_layout is Layout.PER_EXPERT else mapping.disk_layout)
    )
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
        file_layout = shard_by_size(plan.outputs, max_bytes, _file_metadata(target))
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


# ---------------------------------------------------------------- verify


class PlannedReader:
    """Reads byte ranges of a plan's OUTPUT tensors without writing them (one expert materialised at a time)."""

    def __init__(self, plan: Plan, files: SourceFiles) -> None:
        self.files = files
        self.out = {t.name: t for t in plan.outputs}
        self._starts = {t.name: [p.dst for p in sorted(t.pieces, key=lambda p: p.dst)] for t in plan.outputs}
        self._sorted = {t.name: sorted(t.pieces, key=lambda p: p.dst) for t in plan.outputs}
        self._cache: tuple[object, bytes] | None = None

    def _piece(self, p: Copy | Transform, lo: int, hi: int) -> bytes:
        if isinstance(p, Copy):
            return self.files.read(p.key, p.src + lo, hi - lo)
        if self._cache is None or self._cache[0] is not p:
            self._cache = (p, piece_bytes(self.files, p))
        return self._cache[1][lo:hi]

    def read(self, key: str, off: int, n: int) -> bytes:
        pieces, starts = self._sorted[key], self._starts[key]
        i = max(0, bisect.bisect_right(starts, off) - 1)
        out = bytearray()
        pos, end = off, off + n
        while pos < end:
            p = pieces[i]
            lo, hi = pos - p.dst, min(end, p.dst + p.n) - p.dst
            out += self._piece(p, lo, hi)
            pos = p.dst + hi
            i += 1
        return bytes(out)


@dataclass
class VerifyResult:
    src: str
    model_type: str
    source_layout: Layout
    via_layout: Layout
    tensors: int
    bytes_compared: int
    mismatches: list[str]
    seconds: float
    checksums_checked: int = 0  # tensors checked against the checksums merge recorded (a merged checkpoint)
    checksum_algorithm: str | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _virtual_checkpoint(ckpt: Checkpoint, plan: Plan, sidecar: dict) -> Checkpoint:
    tensors, pos = {}, 0
    infos = []
    for t in plan.outputs:
        info = TensorInfo(t.name, t.dtype, t.shape, "<planned>", pos, t.nbytes)
        tensors[t.name] = info
        infos.append(info)
        pos += t.nbytes
    header = FileHeader("<planned>", tuple(infos), _file_metadata(plan.target_layout), 0, pos)
    return Checkpoint(ckpt.root, {"<planned>": header}, tensors, ckpt.config, {}, sidecar)


def verify(
    src: str | Path,
    *,
    model_type: str | None = None,
    revision: str | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    window: int = 32 << 20,
    source_layout: str | Layout | None = None,
) -> VerifyResult:
    """Convert there and back in a bounded-memory stream and compare bit for bit with the source. On a merged
    checkpoint whose sidecar holds checksums, also rebuild every original tensor and compare its checksum."""
    t0 = time.perf_counter()
    given = _layout_arg(source_layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--source-layout")
    ckpt, mapping, mt = _open(src, revision, model_type)
    probe = plan_conversion(ckpt, mapping, Layout.FUSED, naming="model", model_type=mt, source_layout=given)
    src_layout = probe.source_layout
    if src_layout is Layout.FUSED and mapping.groups:
        via = Layout.PER_EXPERT
    else:
        via = Layout.FUSED
    forward = probe if via is Layout.FUSED else plan_conversion(ckpt, mapping, via, naming="disk", model_type=mt)
    disk_naming = src_layout is Layout.PER_EXPERT or any(mapping.to_model_key(k) != k for k in ckpt.tensors)
    sidecar = _sidecar(ckpt, forward, mt)
    sidecar["original_layout"] = str(src_layout)
    sidecar["original"] = record_original(ckpt)
    virtual = _virtual_checkpoint(ckpt, forward, sidecar)
    back = plan_conversion(virtual, mapping, src_layout, naming="disk" if disk_naming else "model", model_type=mt)
    mismatches: list[str] = []

    # names, dtypes, shapes and shard assignment
    out = {t.name: t for t in back.outputs}
    if set(out) != set(ckpt.tensors):
        lost = sorted(set(ckpt.tensors) - set(out))
        new = sorted(set(out) - set(ckpt.tensors))
        mismatches.append(f"key sets differ: {len(lost)} lost (e.g. {lost[:1]}), {len(new)} new (e.g. {new[:1]})")
    try:
        restored = restore_layout(back.outputs, sidecar["original"])
        for f in restored.files:
            orig = ckpt.files[f.name]
            if [t.name for t in f.tensors] != [t.name for t in orig.tensors] or f.metadata != orig.metadata:
                mismatches.append(f"shard {f.name}: tensor order or metadata would not be restored")
    except ConvertError as e:
        mismatches.append(f"shard assignment would not be restored: {e}")

    files = SourceFiles(ckpt)
    reader = PlannedReader(forward, files)
    total = sum(t.nbytes for t in back.outputs)
    cb = progress(total, len(back.outputs)) if progress else None
    compared = 0
    try:
        for t in back.outputs:
            orig = ckpt.tensors.get(t.name)
            if orig is None:
                continue
            if (orig.dtype, orig.shape) != (t.dtype, t.shape):
                mismatches.append(f"{t.name}: {t.dtype}{list(t.shape)} != source {orig.dtype}{list(orig.shape)}")
                continue
            for p in sorted(t.pieces, key=lambda p: p.dst):
                if isinstance(p, Copy):
                    for lo in range(0, p.n, window):
                        n = min(window, p.n - lo)
                        got = reader.read(p.key, p.src + lo, n)
                        if got != files.read(t.name, p.dst + lo, n):
                            mismatches.append(
                                f"{t.name}: bytes {p.dst + lo}..{p.dst + lo + n} differ after the round trip"
                            )
                            break
                else:
                    got = _transform_via(reader, p)
                    if got != files.read(t.name, p.dst, p.n):
                        mismatches.append(f"{t.name}: expert {p.expert} differs after the round trip")
                compared += p.n
                if cb:
                    cb(p.n)
    finally:
        files.close()
    checked, algorithm = _check_recorded_checksums(ckpt, mapping, mt, given, mismatches, window)
    return VerifyResult(
        str(ckpt.root),
        mt,
        src_layout,
        via,
        len(back.outputs),
        compared,
        mismatches,
        time.perf_counter() - t0,
        checked,
        algorithm,
    )


def _check_recorded_checksums(
    ckpt: Checkpoint, mapping: MoEMapping, mt: str, given: Layout | None, mismatches: list[str], window: int
) -> tuple[int, str | None]:
    """Rebuild every original tensor from a merged checkpoint (the split plan, streamed) and compare its checksum
    with the one merge recorded; returns how many were checked and the algorithm."""
    sums = (ckpt.sidecar or {}).get("checksums")
    recorded = (ckpt.sidecar or {}).get("original_layout")
    if not sums or not recorded:
        return 0, None
    plan = plan_conversion(ckpt, mapping, Layout(recorded), naming="disk", model_type=mt, source_layout=given)
    produced = {t.name for t in plan.outputs}
    for name in sorted(set(sums["tensors"]) - produced)[:5]:
        mismatches.append(f"{name}: has a recorded checksum but the merged checkpoint does not rebuild it")
    files = SourceFiles(ckpt)
    reader = PlannedReader(plan, files)
    try:
        for t in plan.outputs:
            want = sums["tensors"].get(t.name)
            h = new_hasher(sums["algorithm"])
            for off in range(0, t.nbytes, window):
                h.update(reader.read(t.name, off, min(window, t.nbytes - off)))
            if want is None:
                mismatches.append(f"{t.name}: no checksum recorded at merge time")
            elif h.hexdigest() != want:
                mismatches.append(
                    f"{t.name}: checksum differs from the one recorded at merge time (the merged files changed)"
                )
    finally:
        files.close()
    return len(plan.outputs), sums["algorithm"]


def _transform_via(reader: PlannedReader, p: Transform) -> bytes:
    from .engine import transform_bytes

    return transform_bytes(reader.read, p)


# ---------------------------------------------------------------- inspect


def ep_ranges(num_experts: int, ep: int) -> list[range]:
    """Experts of each EP rank under DTensor's `Shard(0)` (torch.chunk) rule: the first ranks get ceil(E/ep)."""
    size = math.ceil(num_experts / ep)
    return [range(min(r * size, num_experts), min((r + 1) * size, num_experts)) for r in range(ep)]


def inspect(
    src: str | Path,
    *,
    model_type: str | None = None,
    revision: str | None = None,
    ep: int | None = None,
    dry_run: bool = False,
    source_layout: str | Layout | None = None,
) -> dict:
    """Model type, layout, plan summary (and bytes per EP rank). `dry_run`: from config.json and the index alone."""
    if dry_run:
        return inspect_dry_run(src, model_type=model_type, revision=revision)
    given = _layout_arg(source_layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--source-layout")
    ckpt, mapping, mt = _open(src, revision, model_type)
    plan = plan_conversion(ckpt, mapping, Layout.FUSED, naming="model", model_type=mt, source_layout=given)
    groups: dict[str, dict] = {}
    for gi in plan.instances:
        g = groups.setdefault(
            gi.group.fused,
            {
                "fused": gi.group.fused,
                "parts": list(gi.group.parts),
                "instances": 0,
                "experts": gi.num_experts,
                "part_shapes": [list(s) for s in gi.part_shapes],
                "dtype": gi.dtype,
            },
        )
        g["instances"] += 1
    # expert tensors: the fused groups, plus the mapping's `expert_tensors` (types stored as the model holds them:
    # gpt_oss, llama4, dbrx, jetmoe; MXFP4 blocks/scales), all sharded along dim 0 by expert parallelism
    templates = [Template(x) for x in mapping.expert_tensors]
    expert_outs = [
        t for t in plan.outputs if t.group is not None or (t.shape and any(x.match(t.name) for x in templates))
    ]
    expert_bytes = sum(t.nbytes for t in expert_outs)
    info = {
        "source": str(ckpt.root),
        "model_type": mt,
        "family": mapping.family,
        "layout": str(plan.source_layout),
        "hub_layout": str(mapping.disk_layout) if mapping.groups else "fused (disk equals model)",
        "files": len(ckpt.files),
        "tensors": len(ckpt.tensors),
        "total_bytes": ckpt.total_bytes,
        "expert_bytes": expert_bytes,
        "non_expert_bytes": ckpt.total_bytes - expert_bytes,
        "groups": list(groups.values()),
        "passthrough": len(plan.passthrough),
        "plan": {"target": "fused", "outputs": len(plan.outputs), "notes": plan.notes},
        "quantization": (ckpt.config.get("quantization_config") or {}).get("quant_method"),
    }
    if ep:
        if ep < 1:
            raise ConvertError("--ep must be a positive integer")
        ranks = []
        for r in range(ep):
            nbytes = 0
            experts: set[int] = set()
            for t in expert_outs:
                E = t.shape[0]
                owned = ep_ranges(E, ep)[r]
                if t.group is not None:
                    experts.update(owned)
                    nbytes += sum(p.n for p in t.pieces if p.expert in owned)
                else:  # a native expert tensor: one Shard(0) byte range (dbrx: E * I expert-major rows)
                    nbytes += len(owned) * (t.nbytes // E if E else 0)
                    n_cfg = mapping.num_experts(ckpt.config) or E
                    rows = E // n_cfg if n_cfg and E % n_cfg == 0 else 1  # rows per expert
                    if owned:
                        experts.update(range(owned.start // rows, -(-owned.stop // rows)))
            ranks.append(
                {
                    "rank": r,
                    "experts": [min(experts), max(experts)] if experts else [],
                    "num_experts": len(experts),
                    "expert_bytes": nbytes,
                    "non_expert_bytes": info["non_expert_bytes"],
                    "bytes_read": nbytes + info["non_expert_bytes"],
                }
            )
        info["ep"] = {"size": ep, "ranks": ranks}
    return info


# ---------------------------------------------------------------- dry run: config.json and the index alone


def _index_source(src: str | Path, revision: str | None) -> Path:
    """A local folder as is; a hub repo id fetches only config.json and the safetensors index."""
    text = str(src)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return resolve_source(text, revision)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(text, revision=revision, allow_patterns=["config.json", "*.safetensors.index.json"])
        )
    except Exception as e:  # noqa: BLE001 - hub errors vary; the message says what to do
        raise ConvertError(
            f"cannot fetch config.json and {INDEX_NAME} of {text!r} from the hub ({type(e).__name__}); check the name, log in, or download them"
        ) from e


def index_keys(folder: Path, *, require_config: bool = True) -> tuple[list[str], dict]:
    """Tensor names from `model.safetensors.index.json` (no weight file is opened), else from the shard headers."""
    config: dict = {}
    if (folder / "config.json").exists():
        config = _load_json(folder / "config.json", "config.json")
    elif require_config:
        raise ConvertError(
            f"{folder} has no config.json; copy the model's config.json next to the index or pass --model-type"
        )
    if (folder / INDEX_NAME).exists():
        wm = _load_json(folder / INDEX_NAME, "the safetensors index").get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConvertError(f"{folder / INDEX_NAME}: no weight_map; fix the index")
        return [str(k) for k in wm], config
    if any(folder.glob("*.safetensors")):
        return list(open_checkpoint(folder, require_config=False).tensors), config
    raise ConvertError(f"{folder} has neither {INDEX_NAME} nor safetensors shards; a dry run needs the index")


def inspect_dry_run(src: str | Path, *, model_type: str | None = None, revision: str | None = None) -> dict:
    """Key coverage from config.json and the index alone: every key the mapping would not know how to map."""
    folder = _index_source(src, revision)
    keys, config = index_keys(folder, require_config=model_type is None)
    mt = model_type or config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ConvertError(f"{folder / 'config.json'} has no model_type; pass --model-type")
    mapping = get_mapping(mt)
    cov = key_coverage(keys, mapping, config, model_type=mt)
    return {
        "source": str(folder),
        "model_type": mt,
        "family": mapping.family,
        "dry_run": True,
        "layout": str(cov.layout) if cov.layout else "fused (disk equals model)" if not mapping.groups else None,
        "hub_layout": str(mapping.disk_layout) if mapping.groups else "fused (disk equals model)",
        "quantization": (config.get("quantization_config") or {}).get("quant_method"),
        "tensors": cov.keys,
        "groups": list(cov.groups.values()),
        "expert_tensors": cov.expert_tensors,
        "passthrough": cov.passthrough,
        "renamed": cov.renamed,
        "unmapped": cov.unmapped,
        "problems": cov.problems,
        "complete": cov.complete,
    }


def checkpoint_from_shapes(root: Path, config: dict, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> Checkpoint:
    """A header-only stand-in (no file) for planning: key -> (safetensors dtype, shape), laid out in order."""
    infos, pos = [], 0
    for key, (dtype, shape) in shapes.items():
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        infos.append(TensorInfo(key, dtype, tuple(shape), "<index>", pos, n))
        pos += n
    header = FileHeader("<index>", tuple(infos), {"format": "pt"}, 0, pos)
    return Checkpoint(Path(root), {"<index>": header}, {t.name: t for t in infos}, config, {}, None)


def plan_from_index(
    src: str | Path,
    shapes: dict[str, tuple[str, tuple[int, ...]]],
    *,
    model_type: str | None = None,
    revision: str | None = None,
    layout: str | Layout = "fused",
    naming: str = "model",
) -> Plan:
    """The conversion plan of a checkpoint known only by config.json, its index and the given dtypes and shapes."""
    folder = _index_source(src, revision)
    keys, config = index_keys(folder, require_config=model_type is None)
    mt = model_type or config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ConvertError(f"{folder / 'config.json'} has no model_type; pass --model-type")
    missing = [k for k in keys if k not in shapes]
    extra = sorted(set(shapes) - set(keys))
    if missing or extra:
        raise ConvertError(
            f"shapes do not match the index: {len(missing)} keys without a shape (e.g. {missing[:1]}), {len(extra)} unknown (e.g. {extra[:1]})"
        )
    target = _layout_arg(layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--layout")
    ckpt = checkpoint_from_shapes(folder, config, {k: shapes[k] for k in keys})
    return plan_conversion(ckpt, get_mapping(mt), target, naming=naming, model_type=mt)


# ---------------------------------------------------------------- state dicts for the model zoo


def load_fused_state_dict(
    src: str | Path, *, revision: str | None = None, model_type: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (any supported layout) in transformers v5's naming and fused layout."""
    ckpt, mapping, mt = _open(src, revision, model_type)
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


def plan_summary(plan: Plan) -> dict:
    return {
        "source_layout": str(plan.source_layout),
        "target_layout": str(plan.target_layout),
        "outputs": len(plan.outputs),
        "fused": sum(1 for t in plan.outputs if t.fused),
        "passthrough": len(plan.passthrough),
    }


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
