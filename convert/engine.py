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
- Atomicity: everything is written into a hidden sibling `.<dst>.partial-*`, fsynced, and renamed to `dst` at the
  end under an exclusive lock on `dst` (`destination.py`: a rename that never replaces a folder that appeared
  meanwhile; with `--overwrite` an atomic exchange). On any error, Ctrl-C or SIGTERM the partial folder is removed;
  `dst` is either absent, the old folder (without `--overwrite` it is never touched) or the complete new checkpoint.
- Integrity: every source read is checked against the shard's size, mtime and inode when its header was read;
  `merge` records a checksum of every source tensor (hashed while it is copied), `split` checks its output against
  them before the rename. Source I/O errors are reported as source problems, never as destination problems.
- Output files take the source's permission bits (the first shard's; the folder's for the folder).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import math
import os
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import INDEX_NAME, PICKLE_SUFFIXES, SIDECAR_NAME, Checkpoint, is_plain_file_name
from .checksums import DEFAULT_ALGORITHM, DigestBook, Hasher, new_hasher
from .destination import (
    Interrupted,
    check_destination,
    clean_stale_partials,
    commit,
    destination_lock,
    fsync_dir,
    libc_function,
    remove_tree,
    signals_deferred,
    staging_path,
)
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
    units = {
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
        "TIB": 1 << 40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    num, m = t, 1
    for unit, mult in units.items():
        if t.endswith(unit):
            num, m = t[: -len(unit)], mult
            break
    try:
        val = float(num) * m
    except ValueError as e:
        raise ConvertError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB") from e
    if not math.isfinite(val) or val < 1 or val > 1 << 62:
        raise ConvertError(
            f"--max-shard-size {text!r} must be a finite size of at least 1 byte; use e.g. 5GB, 500MB or 2GiB"
        )
    return int(val)


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
    files = [
        OutFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, dict(metadata) if metadata else None)
        for i, g in enumerate(groups)
    ]
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
                raise ConvertError(
                    f"the recorded original layout names {k!r}, which this conversion does not produce; pass --no-restore to shard afresh"
                )
            ts.append(by_name[k])
            used.add(k)
        files.append(OutFile(f["name"], ts, f.get("metadata")))
    extra = [t.name for t in tensors if t.name not in used]
    if extra:
        raise ConvertError(f"{extra[0]!r} is not in the recorded original layout; pass --no-restore to shard afresh")
    return FileLayout(
        files,
        write_index=bool(original.get("has_index", True)),
        index_metadata=dict(original.get("index_metadata") or {}),
        index_text=original.get("index_text"),
    )


def record_original(ckpt: Checkpoint) -> dict:
    """What split needs to restore `ckpt`'s shards exactly (the index text verbatim up to 16 MB)."""
    index_text = None
    if ckpt.has_index and (ckpt.root / INDEX_NAME).stat().st_size <= 16 << 20:
        index_text = (ckpt.root / INDEX_NAME).read_text(encoding="utf-8")
    return {
        "has_index": ckpt.has_index,
        "index_text": index_text,
        "index_metadata": ckpt.index_metadata,
        "files": [
            {"name": name, "metadata": h.metadata, "keys": [t.name for t in h.tensors]}
            for name, h in ckpt.files.items()
        ],
    }


# ---------------------------------------------------------------- byte movement


def _source_pread(fd: int, n: int, off: int) -> bytes:
    """`os.pread` on a source file (a seam for fault-injection tests)."""
    return os.pread(fd, n, off)


def read_source(fd: int, n: int, off: int, what: str) -> bytes:
    """Read up to `n` source bytes; an I/O error is reported as a problem of the source, not the destination."""
    try:
        return _source_pread(fd, n, off)
    except OSError as e:
        raise ConvertError(
            f"cannot read the source ({what}: {e.strerror or e}); check the source files and their disk"
        ) from e


class SourceFiles:
    """Open source shards lazily; `pread`/`copy_file_range` with explicit offsets are safe across threads.

    A shard whose size, mtime or inode differs from when its header was read is refused (`Checkpoint.check_file`).
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                try:
                    fd = os.open(self.ckpt.path(file), os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise ConvertError(
                        f"cannot open the source shard {file!r} ({e.strerror}); it was moved or deleted during the run"
                    ) from e
                self._fds[file] = fd
                self.ckpt.check_file(file, os.fstat(fd))
            return self._fds[file]

    def locate(self, key: str, off: int) -> tuple[int, int]:
        t = self.ckpt.tensors[key]
        return self.fd(t.file), t.start + off

    def read(self, key: str, off: int, n: int) -> bytes:
        fd, pos = self.locate(key, off)
        out = bytearray()
        while len(out) < n:
            b = read_source(fd, min(n - len(out), CHUNK * 4), pos + len(out), self.ckpt.tensors[key].file)
            if not b:
                raise ConvertError(
                    f"{self.ckpt.tensors[key].file}: ended early while reading {key!r}; the shard is truncated, re-download it"
                )
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


def pwrite_all(fd: int, data: bytes | memoryview, off: int) -> None:
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, off)
        view, off = view[k:], off + k


def copy_range(
    src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int, what: str = "", hasher: Hasher | None = None
) -> None:
    """Copy `n` bytes between files at explicit offsets, hashing them into `hasher` when given.

    Small pieces go through one buffer (hashed there, for free); large ones are copied in the kernel and hashed from
    a second read of the source range (page cache) into one reused buffer, so no large copy allocates per chunk."""
    if n < SMALL_COPY or not _copy_file_range_ok:
        _copy_via_buffer(src_fd, src_off, dst_fd, dst_off, n, what, hasher)
        return
    _copy_in_kernel(src_fd, src_off, dst_fd, dst_off, n, what)
    if hasher is not None:
        hash_source_range(src_fd, src_off, n, hasher, what)


def hash_source_range(fd: int, off: int, n: int, hasher: Hasher, what: str) -> None:
    buf = bytearray(min(n, CHUNK))
    view = memoryview(buf)
    done = 0
    while done < n:
        k = _source_preadv(fd, view[: min(n - done, len(buf))], off + done, what)
        if k == 0:
            raise ConvertError(f"source ended early while hashing {what}; the shard is truncated, re-download it")
        hasher.update(view[:k])
        done += k


def _source_preadv(fd: int, view: memoryview, off: int, what: str) -> int:
    try:
        return os.preadv(fd, [view], off)
    except OSError as e:
        raise ConvertError(
            f"cannot read the source ({what}: {e.strerror or e}); check the source files and their disk"
        ) from e


def _copy_via_buffer(
    src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int, what: str, hasher: Hasher | None
) -> None:
    done = 0
    while done < n:
        buf = read_source(src_fd, min(n - done, CHUNK), src_off + done, what)
        if not buf:
            raise ConvertError(f"source ended early while copying {what}; the shard is truncated, re-download it")
        if hasher is not None:
            hasher.update(buf)
        pwrite_all(dst_fd, buf, dst_off + done)
        done += len(buf)


def _copy_in_kernel(src_fd: int, src_off: int, dst_fd: int, dst_off: int, n: int, what: str) -> None:
    global _copy_file_range_ok
    while n > 0:
        try:
            k = os.copy_file_range(src_fd, dst_fd, min(n, 1 << 30), src_off, dst_off)
        except OSError as e:
            if e.errno not in _NO_COPY_FILE_RANGE:
                raise
            _copy_file_range_ok = False
            _copy_via_buffer(src_fd, src_off, dst_fd, dst_off, n, what, None)
            return
        if k == 0:
            raise ConvertError(f"source ended early while copying {what}; the shard is truncated, re-download it")
        src_off, dst_off, n = src_off + k, dst_off + k, n - k


_fallocate = libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


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

# fsync every output file and folder before the final rename (measured cost: see docs); "0" turns it off for
# measurements only.
FSYNC = os.environ.get("AUTOMODEL_CONVERT_FSYNC", "1") != "0"


def fsync_fd(fd: int) -> None:
    if FSYNC:
        os.fsync(fd)


_sync_file_range = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to start writing a just-written range to disk now (asynchronously), so that the fsync before
    the final rename waits for the tail only instead of the whole checkpoint. Best effort."""
    if FSYNC and _sync_file_range is not None and n > 0:
        _sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread for the block (so clean-up code runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt("terminated")

    old = signal.signal(signal.SIGTERM, _term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _remove_quietly(folder: Path) -> None:
    """Remove a staging folder; a second Ctrl-C / SIGTERM must not interrupt it."""
    with signals_deferred():
        remove_tree(folder)


@contextmanager
def atomic_folder(
    dst: Path,
    overwrite: bool,
    *,
    source: Path | None = None,
    force: bool = False,
    notes: list[str] | None = None,
    dir_mode: int | None = None,
) -> Iterator[Path]:
    """Yield a staging folder that becomes `dst` only if the block completes (see `destination.py`)."""
    dst = Path(os.path.abspath(dst))
    if not dst.name:
        raise ConvertError(f"destination {str(dst)!r} is a filesystem root; write to a new folder")
    if not dst.parent.is_dir():
        raise ConvertError(f"the parent folder of {str(dst)!r} does not exist; create it first")
    with destination_lock(dst):
        tidied = clean_stale_partials(dst)  # first: it may put back a destination a killed run moved aside
        if notes is not None:
            notes.extend(tidied)
        check_destination(dst, source, overwrite, force)
        staging = staging_path(dst)
        with _sigterm_raises():
            try:
                _make_staging(staging, dst)
                yield staging
                if dir_mode is not None:
                    os.chmod(staging, dir_mode)
                if FSYNC:
                    fsync_dir(staging)
                commit(staging, dst, overwrite, force)
            except BaseException as e:
                if not (isinstance(e, Interrupted) and e.committed):
                    _remove_quietly(staging)
                raise


def _make_staging(staging: Path, dst: Path) -> None:
    try:
        staging.mkdir()
    except OSError as e:
        raise ConvertError(f"cannot write to {str(dst.parent)!r} ({e.strerror}); choose a writable destination") from e


def _no_space(e: OSError, dst: Path) -> ConvertError:
    return ConvertError(
        f"no space left while writing {str(dst)!r} ({e.strerror}); free disk space or choose another destination (nothing was left behind)"
    )


def _write_error(e: OSError, dst: Path) -> ConvertError:
    if e.errno in _NO_SPACE:
        return _no_space(e, dst)
    return ConvertError(f"cannot write {str(dst)!r}: {e.strerror or e}; check the destination and free space")


# ---------------------------------------------------------------- execution


def copy_extra_file(src: Path, dst: Path) -> None:
    """Copy one non-weight file with its permissions and times, fsynced. A failure to read raises an OSError whose
    `filename` is the source path; a failure to write, one whose `filename` is the destination path."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while True:
            try:
                buf = fin.read(CHUNK)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(src)) from e
            if not buf:
                break
            fout.write(buf)
        fout.flush()
        fsync_fd(fout.fileno())
    shutil.copystat(src, dst)


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
        try:
            copy_extra_file(p, staging / p.name)
        except OSError as e:
            if e.filename is not None and Path(e.filename) == p:
                raise ConvertError(
                    f"cannot read the source file {p.name!r} ({e.strerror}); check its permissions and disk, or remove it from the source"
                ) from e
            raise
        copied.append(p.name)
    return copied


def write_small_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        pwrite_all(fd, data, 0)
        fsync_fd(fd)
    finally:
        os.close(fd)


@dataclass
class WriteResult:
    files: list[str]
    tensors: int
    bytes_written: int
    extra_files: list[str]
    notes: list[str] = field(default_factory=list)
    checksums: dict | None = None


Task = tuple[int, int, list]  # (output fd, bytes, [(out tensor, piece, tensor base offset)])


def _file_tasks(fd: int, of: OutFile, header_len: int, offsets: list[int]) -> list[Task]:
    """One output file's pieces in batches of about 64 MB."""
    tasks: list[Task] = []
    batch: list = []
    batch_bytes = 0
    for t, off in zip(of.tensors, offsets):
        for p in coalesce_reads(t.pieces):
            batch.append((t, p, header_len + off))
            batch_bytes += p.n
            if batch_bytes >= 64 << 20:
                tasks.append((fd, batch_bytes, batch))
                batch, batch_bytes = [], 0
    if batch:
        tasks.append((fd, batch_bytes, batch))
    return tasks


class Digests:
    """What the writer hashes: whole source tensors (`record`, merge) and whole output tensors (`check`, split)."""

    def __init__(self, ckpt: Checkpoint, record: bool, check: dict | None) -> None:
        self.ckpt = ckpt
        self.algorithm = (check or {}).get("algorithm", DEFAULT_ALGORITHM)
        self.sources = DigestBook(self.algorithm) if record else None
        self.outputs = DigestBook(self.algorithm) if check is not None else None
        self.expected: dict[str, str] = (check or {}).get("tensors", {})

    @property
    def active(self) -> bool:
        return self.sources is not None or self.outputs is not None

    def hasher_for(self, t: OutTensor, p: Copy | Transform) -> tuple[Hasher | None, str | None, str | None]:
        """A hasher when the piece is a whole source tensor (recorded) or a whole output tensor (checked)."""
        src_key = None
        if self.sources is not None and isinstance(p, Copy) and p.src == 0 and p.n == self.ckpt.tensors[p.key].nbytes:
            src_key = p.key
        out_name = t.name if self.outputs is not None and p.dst == 0 and p.n == t.nbytes else None
        if src_key is None and out_name is None:
            return None, None, None
        return new_hasher(self.algorithm), src_key, out_name

    def done(self, hasher: Hasher | None, src_key: str | None, out_name: str | None) -> None:
        if hasher is None:
            return
        hexd = hasher.hexdigest()
        if src_key is not None:
            self.sources.add(src_key, hexd)
        if out_name is not None:
            self.outputs.add(out_name, hexd)


def _run_task(task: Task, files: SourceFiles, digests: Digests, progress: Callable[[int], None] | None) -> None:
    fd, _, batch = task
    lo = hi = batch[0][2] + batch[0][1].dst
    for t, p, base in batch:
        lo, hi = min(lo, base + p.dst), max(hi, base + p.dst + p.n)
        hasher, src_key, out_name = digests.hasher_for(t, p) if digests.active else (None, None, None)
        if isinstance(p, Copy):
            sfd, soff = files.locate(p.key, p.src)
            copy_range(sfd, soff, fd, base + p.dst, p.n, repr(p.key), hasher)
        else:
            data = transform_bytes(files.read, p)
            if hasher is not None:
                hasher.update(data)
            pwrite_all(fd, data, base + p.dst)
        digests.done(hasher, src_key, out_name)
        if progress:
            progress(p.n)
    start_writeback(fd, lo, hi - lo)


def _hash_remaining_sources(files: SourceFiles, digests: Digests) -> None:
    """Source tensors that no single piece covered (fused sources read per expert): one sequential read each."""
    if digests.sources is None:
        return
    for key, info in files.ckpt.tensors.items():
        if key not in digests.sources.digests:
            h = new_hasher(digests.algorithm)
            for off in range(0, info.nbytes, CHUNK):
                h.update(files.read(key, off, min(CHUNK, info.nbytes - off)))
            digests.sources.add(key, h.hexdigest())


def _check_outputs(staging: Path, layout: FileLayout, placed: dict[str, tuple[str, int]], digests: Digests) -> None:
    """Every output tensor's digest (read back where no single piece covered it) against the recorded checksums."""
    if digests.outputs is None:
        return
    for of in layout.files:
        for t in of.tensors:
            got = digests.outputs.digests.get(t.name)
            if got is None:
                got = _hash_written(staging / placed[t.name][0], placed[t.name][1], t.nbytes, digests.algorithm)
            want = digests.expected.get(t.name)
            if want is None:
                raise ConvertError(
                    f"automodel_convert.json has no checksum for {t.name!r}; the sidecar is incomplete, pass --no-restore"
                )
            if got != want:
                raise ConvertError(
                    f"{t.name!r} does not match the checksum recorded at merge time: the merged checkpoint is corrupt (run `automodel-convert verify` on it); nothing was written"
                )


def _hash_written(path: Path, start: int, n: int, algorithm: str) -> str:
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        f.seek(start)
        left = n
        while left:
            buf = f.read(min(CHUNK, left))
            if not buf:
                raise ConvertError(f"{path.name}: ended early while checking it")
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def _open_outputs(
    staging: Path, layout: FileLayout, file_mode: int, fds: list[int]
) -> tuple[list[list[Task]], dict[str, tuple[str, int]], int]:
    """Create every output shard (header written, full size allocated); their tasks, tensor placements, bytes."""
    per_file: list[list[Task]] = []
    placed: dict[str, tuple[str, int]] = {}
    total = 0
    for of in layout.files:
        header, offsets = encode_header([(t.name, t.dtype, t.shape) for t in of.tensors], of.metadata)
        fd = os.open(staging / of.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, file_mode)
        fds.append(fd)
        os.fchmod(fd, file_mode)
        pwrite_all(fd, header, 0)
        size = len(header) + of.nbytes
        preallocate(fd, size)
        total += size
        placed.update({t.name: (of.name, len(header) + off) for t, off in zip(of.tensors, offsets)})
        per_file.append(_file_tasks(fd, of, len(header), offsets))
    return per_file, placed, total


def _run_pool(
    tasks: list[Task], workers: int, files: SourceFiles, digests: Digests, progress: Callable[[int], None] | None
) -> None:
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for _ in pool.map(lambda task: _run_task(task, files, digests, progress), tasks):
            pass
    finally:
        with signals_deferred():  # the workers stop before any clean-up starts, whatever signals keep arriving
            pool.shutdown(wait=True, cancel_futures=True)


def source_modes(ckpt: Checkpoint) -> tuple[int, int]:
    """(folder mode, file mode) of the source: its folder's, and its first shard's permission bits."""
    dir_mode = stat.S_IMODE(os.stat(ckpt.root).st_mode)
    first = next(iter(ckpt.files), None)
    try:
        file_mode = stat.S_IMODE(os.stat(ckpt.path(first)).st_mode) if first else 0o644
    except OSError:
        file_mode = 0o644
    return dir_mode, file_mode


def write_checkpoint(
    plan: Plan,
    ckpt: Checkpoint,
    dst: Path,
    layout: FileLayout,
    *,
    overwrite: bool = False,
    force: bool = False,
    workers: int = 4,
    sidecar: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
    progress: Callable[[int], None] | None = None,
    record_checksums: bool = False,
    expected_checksums: dict | None = None,
) -> WriteResult:
    """Write `plan`'s outputs as `layout`'s shards into `dst`, atomically.

    `record_checksums`: hash every source tensor while copying it and store the digests in the sidecar.
    `expected_checksums`: hash every output tensor and refuse (nothing written) if one differs from the record.
    """
    dst = Path(dst)
    _check_names(layout, extra_files)
    notes: list[str] = []
    dir_mode, file_mode = source_modes(ckpt)
    files = SourceFiles(ckpt)
    digests = Digests(ckpt, record_checksums, expected_checksums)
    fds: list[int] = []
    try:
        with atomic_folder(dst, overwrite, source=ckpt.root, force=force, notes=notes, dir_mode=dir_mode) as staging:
            try:
                copied = copy_extra_files(ckpt.root, staging, set(extra_files or ()))
                for name, data in (extra_files or {}).items():
                    write_small_file(staging / name, data, file_mode)
                per_file, placed, total = _open_outputs(staging, layout, file_mode, fds)
                # round-robin over the output files: buffered writes to one file serialize on its inode lock, so
                # the workers should be writing different files where there are several
                tasks = [t for group in itertools.zip_longest(*per_file) for t in group if t is not None]
                _run_pool(tasks, workers, files, digests, progress)
                for fd in fds:
                    fsync_fd(fd)
                _hash_remaining_sources(files, digests)
                ckpt.check_unchanged()
                _check_outputs(staging, layout, placed, digests)
                if layout.write_index:
                    index = render_index(layout, sum(of.nbytes for of in layout.files)).encode()
                    write_small_file(staging / INDEX_NAME, index, file_mode)
                if sidecar is not None:
                    if digests.sources is not None:
                        sidecar = {**sidecar, "checksums": digests.sources.sidecar_block()}
                    write_small_file(staging / SIDECAR_NAME, (json.dumps(sidecar, indent=1) + "\n").encode(), file_mode)
            except OSError as e:
                raise _write_error(e, dst) from e
            finally:
                for fd in fds:
                    os.close(fd)
                fds.clear()
    finally:
        files.close()
    checks = digests.sources.sidecar_block() if digests.sources is not None else None
    return WriteResult(
        [of.name for of in layout.files], sum(len(of.tensors) for of in layout.files), total, copied, notes, checks
    )


def _check_names(layout: FileLayout, extra_files: dict[str, bytes] | None) -> None:
    """Every output file name is a plain, distinct name inside the destination (defence in depth; see
    `checkpoint.validate_sidecar` for the user-facing check)."""
    names = [of.name for of in layout.files] + list(extra_files or ())
    for name in names:
        if not is_plain_file_name(name):
            raise ConvertError(f"refusing to write {name!r}: output files must be plain names inside the destination")
    if len(set(names)) != len(names):
        raise ConvertError(
            "two output files would have the same name; the recorded layout is corrupt, pass --no-restore"
        )


def coalesce_reads(pieces: list) -> list:
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
