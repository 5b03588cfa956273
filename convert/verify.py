"""`verify`: prove a conversion there and back (or a merged checkpoint's recorded checksums) without writing.

Contract: `verify(src)` plans the conversion there and back, streams both one expert at a time and compares every
byte, dtype, shape, name and shard assignment with the source; on a merged checkpoint with recorded checksums it
also rebuilds every original tensor and checks its checksum. Nothing is written. Raises `ConvertError` (one line).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .checksums import new_hasher
from .engine import (
    SourceFiles,
    piece_bytes,
    record_original,
    restore_layout,
)
from .errors import ConvertError
from .mapping import Layout, MoEMapping
from .plan import Copy, Plan, Transform, plan_conversion
from .safetensors_io import FileHeader, TensorInfo

if TYPE_CHECKING:
    pass


from .resolve import file_metadata, layout_arg, open_source, read_sidecar

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
    header = FileHeader("<planned>", tuple(infos), file_metadata(plan.target_layout), 0, pos)
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
    given = layout_arg(source_layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--source-layout")
    ckpt, mapping, mt = open_source(src, revision, model_type)
    probe = plan_conversion(ckpt, mapping, Layout.FUSED, naming="model", model_type=mt, source_layout=given)
    src_layout = probe.source_layout
    if src_layout is Layout.FUSED and mapping.groups:
        via = Layout.PER_EXPERT
    else:
        via = Layout.FUSED
    forward = probe if via is Layout.FUSED else plan_conversion(ckpt, mapping, via, naming="disk", model_type=mt)
    disk_naming = src_layout is Layout.PER_EXPERT or any(mapping.to_model_key(k) != k for k in ckpt.tensors)
    sidecar = read_sidecar(ckpt, forward, mt)
    sidecar["original_layout"] = str(src_layout)
    sidecar["original"] = record_original(ckpt)
    virtual = _virtual_checkpoint(ckpt, forward, sidecar)
    back = plan_conversion(virtual, mapping, src_layout, naming="disk" if disk_naming else "model", model_type=mt)
    mismatches = _structure_mismatches(ckpt, back, sidecar)
    compared = _compare_bytes(ckpt, forward, back, mismatches, window, progress)
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


def _structure_mismatches(ckpt: Checkpoint, back: Plan, sidecar: dict) -> list[str]:
    """Names and shard assignment of the round trip against the source (no tensor data read)."""
    mismatches: list[str] = []
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
    return mismatches


def _compare_bytes(ckpt: Checkpoint, forward: Plan, back: Plan, mismatches: list[str], window: int,
                   progress: Callable[[int, int], Callable[[int], None]] | None) -> int:
    """Stream every tensor of the round trip (`forward` then `back`, virtually) against the source's bytes, in
    windows; appends one line per differing tensor (and dtype/shape) to `mismatches`; returns the bytes compared."""
    files = SourceFiles(ckpt)
    reader = PlannedReader(forward, files)
    cb = progress(sum(t.nbytes for t in back.outputs), len(back.outputs)) if progress else None
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
                        if reader.read(p.key, p.src + lo, n) != files.read(t.name, p.dst + lo, n):
                            mismatches.append(f"{t.name}: bytes {p.dst + lo}..{p.dst + lo + n} differ after the round trip")
                            break
                elif _transform_via(reader, p) != files.read(t.name, p.dst, p.n):
                    mismatches.append(f"{t.name}: expert {p.expert} differs after the round trip")
                compared += p.n
                if cb:
                    cb(p.n)
    finally:
        files.close()
    return compared


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


