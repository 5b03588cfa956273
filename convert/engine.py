"""The streaming engine: execute a `Plan` into a new checkpoint folder, atomically.

Contract:
- Memory: a `Copy` piece is moved with `os.copy_file_range` (kernel-side, no user-space buffer; `pread`/`pwrite`
  in 16 MiB chunks where the filesystem refuses it); a `Transform` holds one expert's inputs and outputs. Nothing
  ever holds a whole fused tensor or checkpoint, so peak memory does not grow with the checkpoint.
- Files: each output shard gets its full size up front (fallocate where the filesystem has it: contiguous blocks and
  an early, clean failure on a full disk), then pieces are written at their offsets by a small thread pool.
- Output: safetensors shards (headers byte-identical to the Rust writer's), `model.safetensors.index.json` with the
  correct `total_size`, every non-weight file of the source (config, generation config, tokenizer, chat template)
  and the sidecar `automodel_convert.json` recording what `split` needs to restore the original shards.
- Atomicity: everything is written into a hidden sibling `.<dst>.partial-*` and renamed to `dst` at the end. On
  any error, Ctrl-C or SIGTERM the partial folder is removed; `dst` is either absent, the old folder (without
  `--overwrite` it is never touched) or the complete new checkpoint.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import INDEX_NAME, PICKLE_SUFFIXES, SIDECAR_NAME, Checkpoint
from .errors import ConvertError
from .ops import from_bytes, to_bytes
from .plan import Copy, OutTensor, Plan, Transform
from .safetensors_io import encode_header

if TYPE_CHECKING:
    import torch

CHUNK = 16 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM)


@dataclass
class OutFile:
    name: str
    tensors: list[OutTensor]
    metadata: dict[str, str] | None = field(default_factory=lambda: {"format": "pt"})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class FileLayout:
    files: list[OutFile]
    write_index: bool = True
    index_metadata: dict = field(default_factory=dict)
    index_text: str | None = None  # the original index file, verbatim (restored layouts)


def render_index(layout: FileLayout, total_size: int) -> str:
    """The index file's text: the recorded original verbatim when it describes exactly these files (split restores
    the source byte for byte, whatever its formatting), else transformers' format (indent 2, sorted, newline)."""
    meta = dict(layout.index_metadata)
    meta["total_size"] = total_size
    weight_map = {t.name: of.name for of in layout.files for t in of.tensors}
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    if layout.index_text is not None:
        try:
            if json.loads(layout.index_text) == index:
                return layout.index_text
        except ValueError:
            pass
    return json.dumps(index, indent=2) + "\n"


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units like transformers; 'GiB' binary)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    num, m = t, 1
    for unit, mult in units.items():
        if t.endswith(unit):
            num, m = t[: -len(unit)], mult
            break
    try:
        val = float(num)
    except ValueError as e:
        raise ConvertError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB") from e
    if val <= 0:
        raise ConvertError(f"--max-shard-size {text!r} must be positive")
    return int(val * m)


def shard_by_size(tensors: list[OutTensor], max_bytes: int, metadata: dict[str, str] | None) -> FileLayout:
    """Fill shards in order up to `max_bytes` (a tensor larger than the limit gets a shard of its own)."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    files = [OutFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, dict(metadata) if metadata else None) for i, g in enumerate(groups)]
    return FileLayout(files, write_index=True)


def restore_layout(tensors: list[OutTensor], original: dict) -> FileLayout:
    """The original shards: names, tensor order inside each file, per-file metadata, index or not."""
    by_name = {t.name: t for t in tensors}
    files = []
    used = set()
    for f in original["files"]:
        ts = []
        for k in f["keys"]:
            if k not in by_name:
                raise ConvertError(f"the recorded original layout names {k!r}, which this conversion does not produce; pass --no-restore to shard afresh")
            ts.append(by_name[k])
            used.add(k)
        files.append(OutFile(f["name"], ts, f.get("metadata")))
    extra = [t.name for t in tensors if t.name not in used]
    if extra:
        raise ConvertError(f"{extra[0]!r} is not in the recorded original layout; pass --no-restore to shard afresh")
    return FileLayout(files, write_index=bool(original.get("has_index", True)), index_metadata=dict(original.get("index_metadata") or {}),
                      index_text=original.get("index_text"))


def record_original(ckpt: Checkpoint) -> dict:
    """What split needs to restore `ckpt`'s shards exactly (the index text verbatim up to 16 MB)."""
    index_text = None
    if ckpt.has_index and (ckpt.root / INDEX_NAME).stat().st_size <= 16 << 20:
        index_text = (ckpt.root / INDEX_NAME).read_text(encoding="utf-8")
    return {
        "has_index": ckpt.has_index,
        "index_text": index_text,
        "index_metadata": ckpt.index_metadata,
        "files": [{"name": name, "metadata": h.metadata, "keys": [t.name for t in h.tensors]} for name, h in ckpt.files.items()],
    }


# ---------------------------------------------------------------- byte movement


class SourceFiles:
    """Open source shards lazily; `pread`/`copy_file_range` with explicit offsets are safe across threads."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(self.ckpt.path(file), os.O_RDONLY)
            return self._fds[file]

    def locate(self, key: str, off: int) -> tuple[int, int]:
        t = self.ckpt.tensors[key]
        return self.fd(t.file), t.start + off

    def read(self, key: str, off: int, n: int) -> bytes:
        fd, pos = self.locate(key, off)
        out = bytearray()
        while len(out) < n:
            b = os.pread(fd, min(n - len(out), CHUNK * 4), pos + len(out))
            if not b:
                raise ConvertError(f"{self.ckpt.tensors[key].file}: ended early while reading {key!r}; the shard is truncated, re-download it")
            out += b
        with self._lock:
            self.bytes_read += n
        return bytes(out)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_copy_file_range_ok = hasattr(os, "copy_file_range")


# Below this size one pread + pwrite beats copy_file_range (measured on ext4: 3 MB pieces copy at ~0.6 GB/s with
# copy_file_range and ~0.95 GB/s with pread/pwrite per thread; 64 MB ranges reach ~2 GB/s with copy_file_range).
SMALL_COPY = 32 << 20


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int, what: str = "") -> None:
    global _copy_file_range_ok
    if n < SMALL_COPY:
        buf = os.pread(src_fd, n, src_off)
        if len(buf) < n:
            raise ConvertError(f"source ended early while copying {what}; the shard is truncated, re-download it")
        view = memoryview(buf)
        while view:
            k = os.pwrite(dst_fd, view, dst_off)
            view, dst_off = view[k:], dst_off + k
        return
    while n > 0:
        if _copy_file_range_ok:
            try:
                k = os.copy_file_range(src_fd, dst_fd, min(n, 1 << 30), src_off, dst_off)
            except OSError as e:
                if e.errno not in _NO_COPY_FILE_RANGE:
                    raise
                _copy_file_range_ok = False
                continue
        else:
            buf = os.pread(src_fd, min(n, CHUNK), src_off)
            k = os.pwrite(dst_fd, buf, dst_off) if buf else 0
        if k == 0:
            raise ConvertError(f"source ended early while copying {what}; the shard is truncated, re-download it")
        src_off += k
        dst_off += k
        n -= k


def _linux_fallocate() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.fallocate
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    f.restype = ctypes.c_int
    return f


_fallocate = _linux_fallocate()


def preallocate(fd: int, size: int) -> None:
    """Give a new output file its full size: fallocate(2) where the filesystem has it (contiguous blocks, and a
    full disk fails here, before any byte is copied), else ftruncate (sparse). Never glibc's posix_fallocate
    emulation, which writes every block."""
    if _fallocate is not None and size > 0:
        if _fallocate(fd, 0, 0, size) == 0:
            return
        err = ctypes.get_errno()
        if err in _NO_SPACE:
            raise OSError(err, os.strerror(err))
    os.ftruncate(fd, size)


def transform_bytes(src: Callable[[str, int, int], bytes], piece: Transform) -> bytes:
    """Run one Transform: read its inputs, apply its chain on integer views (bit-exact), return the selected output."""
    xs = [from_bytes(src(k, off, n), shape, piece.itemsize) for k, off, n, shape in piece.inputs]
    out = piece.chain.apply(xs)[piece.select]
    return to_bytes(out)


def piece_bytes(files: SourceFiles, piece: Copy | Transform) -> bytes:
    if isinstance(piece, Copy):
        return files.read(piece.key, piece.src, piece.n)
    return transform_bytes(files.read, piece)


# ---------------------------------------------------------------- atomic output


@contextmanager
def atomic_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder that becomes `dst` only if the block completes."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"destination {str(dst)!r} exists; pass --overwrite to replace it or choose another folder")
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"destination {str(dst)!r} is a file; choose a folder path")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.exists():
        raise ConvertError(f"the parent folder of {str(dst)!r} does not exist; create it first")
    staging = parent / f".{dst.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
    except OSError as e:
        raise ConvertError(f"cannot write to {str(parent)!r} ({e.strerror}); choose a writable destination") from e
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):  # noqa: ARG001
            raise KeyboardInterrupt("terminated")

        old_handler = signal.signal(signal.SIGTERM, _term)
    try:
        yield staging
        if dst.exists():
            trash = parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, trash)
            os.rename(staging, dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, dst)
    except BaseException:
        # a second Ctrl-C / SIGTERM must not interrupt the clean-up
        masked = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                masked[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            shutil.rmtree(staging, ignore_errors=True)
        finally:
            for sig, handler in masked.items():
                signal.signal(sig, handler)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _no_space(e: OSError, dst: Path) -> ConvertError:
    return ConvertError(f"no space left while writing {str(dst)!r} ({e.strerror}); free disk space or choose another destination (nothing was left behind)")


# ---------------------------------------------------------------- execution


def copy_extra_files(src: Path, staging: Path, skip: set[str] | None = None) -> list[str]:
    """Copy the source's top-level non-weight files (config, tokenizer, templates...)."""
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(".safetensors") or p.name in (INDEX_NAME, SIDECAR_NAME) or p.name.endswith(PICKLE_SUFFIXES):
            continue
        if skip and p.name in skip:
            continue
        shutil.copy2(p, staging / p.name)
        copied.append(p.name)
    return copied


@dataclass
class WriteResult:
    files: list[str]
    tensors: int
    bytes_written: int
    extra_files: list[str]


def write_checkpoint(
    plan: Plan,
    ckpt: Checkpoint,
    dst: Path,
    layout: FileLayout,
    *,
    overwrite: bool = False,
    workers: int = 4,
    sidecar: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """Write `plan`'s outputs as `layout`'s shards into `dst`, atomically."""
    dst = Path(dst)
    if dst.resolve() == ckpt.root.resolve():
        raise ConvertError("destination is the source folder; write to a new folder")
    files = SourceFiles(ckpt)
    total = 0
    try:
        with atomic_folder(dst, overwrite) as staging:
            try:
                copied = copy_extra_files(ckpt.root, staging, set(extra_files or ()))
                for name, data in (extra_files or {}).items():
                    (staging / name).write_bytes(data)
                per_file: list[list[tuple[int, int, list]]] = []
                fds: list[int] = []
                for of in layout.files:
                    file_tasks: list[tuple[int, int, list]] = []
                    per_file.append(file_tasks)
                    entries = [(t.name, t.dtype, t.shape) for t in of.tensors]
                    header, offsets = encode_header(entries, of.metadata)
                    fd = os.open(staging / of.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                    fds.append(fd)
                    os.pwrite(fd, header, 0)
                    size = len(header) + of.nbytes
                    preallocate(fd, size)
                    total += size
                    batch: list = []
                    batch_bytes = 0
                    for t, off in zip(of.tensors, offsets):
                        base = len(header) + off
                        for p in _coalesce(t.pieces):
                            batch.append((t, p, base))
                            batch_bytes += p.n
                            if batch_bytes >= 64 << 20:
                                file_tasks.append((fd, batch_bytes, batch))
                                batch, batch_bytes = [], 0
                    if batch:
                        file_tasks.append((fd, batch_bytes, batch))
                # round-robin over the output files: buffered writes to one file serialize on its inode lock, so
                # the workers should be writing different files where there are several
                tasks = [t for group in itertools.zip_longest(*per_file) for t in group if t is not None]

                def run(task: tuple[int, int, list]) -> None:
                    fd, _, batch = task
                    for _t, p, base in batch:
                        if isinstance(p, Copy):
                            sfd, soff = files.locate(p.key, p.src)
                            copy_range(sfd, soff, fd, base + p.dst, p.n, repr(p.key))
                        else:
                            data = transform_bytes(files.read, p)
                            os.pwrite(fd, data, base + p.dst)
                        if progress:
                            progress(p.n)

                pool = ThreadPoolExecutor(max_workers=max(1, workers))
                try:
                    for _ in pool.map(run, tasks):
                        pass
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
                for fd in fds:
                    os.close(fd)
                fds.clear()
                if layout.write_index:
                    (staging / INDEX_NAME).write_text(render_index(layout, sum(of.nbytes for of in layout.files)), encoding="utf-8")
                if sidecar is not None:
                    (staging / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=1) + "\n")
            except OSError as e:
                if e.errno in _NO_SPACE:
                    raise _no_space(e, dst) from e
                raise ConvertError(f"cannot write {str(dst)!r}: {e.strerror or e}; check the destination and free space") from e
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        files.close()
    return WriteResult([of.name for of in layout.files], sum(len(of.tensors) for of in layout.files), total, copied)


def _coalesce(pieces: list) -> list:
    """Merge Copy pieces that are contiguous in both source and destination (fewer syscalls)."""
    out: list = []
    for p in sorted(pieces, key=lambda p: p.dst):
        last = out[-1] if out else None
        if (
            isinstance(p, Copy)
            and isinstance(last, Copy)
            and last.key == p.key
            and last.src + last.n == p.src
            and last.dst + last.n == p.dst
        ):
            out[-1] = Copy(last.key, last.src, last.n + p.n, last.dst, None)
        else:
            out.append(p)
    return out


def tensor_from_pieces(files: SourceFiles, t: OutTensor, dtype: torch.dtype) -> torch.Tensor:
    """Materialise one output tensor in memory (used by `load_state_dict`, never by the streaming writer)."""
    import torch

    buf = bytearray(t.nbytes)
    for p in t.pieces:
        buf[p.dst : p.dst + p.n] = piece_bytes(files, p)
    if t.nbytes == 0:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(t.shape)

