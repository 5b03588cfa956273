"""The streaming engine: execute a `Plan` into a new checkpoint folder, atomically.

Contract:
- Memory: every byte goes through one of a few fixed buffers (one per worker, `BUFFER` bytes): read from the
  source into it (`preadv`), hashed there while it is in the CPU cache, written from it. A `Transform` holds one
  expert's inputs and outputs. Nothing ever holds a whole fused tensor or checkpoint, so peak memory does not grow
  with the checkpoint.
- Files: each output shard gets its full size up front (fallocate where the filesystem has it: contiguous blocks and
  an early, clean failure on a full disk), then contiguous ranges of about 64 MB are written by a small thread pool.
  Whole aligned blocks are written with O_DIRECT where the filesystem allows it: no copy into the page cache and no
  write-back left for the fsync before the rename (on our 2-core VM the page cache path made durable writes
  2-3x slower; docs/BENCHMARKS.md); the partial blocks at the ends of each range, and every write on a
  filesystem without O_DIRECT, go through the page cache with write-back started at once (`sync_file_range`).
- Output: safetensors shards (headers byte-identical to the Rust writer's), `model.safetensors.index.json` with the
  correct `total_size`, every non-weight file of the source (config, generation config, tokenizer, chat template)
  and the sidecar `automodel_convert.json` recording what `split` needs to restore the original shards.
- Atomicity: everything is written into a hidden sibling folder, fsynced, and renamed to `dst` at the end under an
  exclusive lock on `dst` (`staging.atomic_folder`, `destination.py`).
- Integrity: every source read is checked against the shard's size, mtime and inode when its header was read;
  `merge` records a checksum of every source tensor (hashed while it is copied), `split` checks its output against
  them before the rename (`checksums.Digests`). Source I/O errors are reported as source problems.
- Output files take the source's permission bits (the first shard's; the folder's for the folder).
- Signals: Ctrl-C or SIGTERM while the workers copy only tells them to stop (each stops before its next piece); the
  signal is delivered again once all have stopped, so the clean-up never runs beside a worker still writing.

The pieces live in: `files.py` (which shards, the index), `sources.py` (reading), `staging.py` (the atomic folder,
extra files), `checksums.py` (hashing); their public names are re-exported here.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import INDEX_NAME, SIDECAR_NAME, Checkpoint
from .checksums import Digests, Hasher, check_outputs, hash_remaining_sources
from .destination import libc_function, signals_deferred
from .files import (
    FileLayout,
    OutFile,
    check_names,
    parse_size,
    record_original,
    render_index,
    restore_layout,
    shard_by_size,
)
from .pieces import Copy, Plan
from .safetensors_io import encode_header
from .sources import (
    MemorySource,
    SourceFiles,
    coalesce_reads,
    piece_bytes,
    tensor_from_pieces,
    transform_bytes,
)
from .staging import (
    FSYNC,
    NO_SPACE,
    atomic_folder,
    copy_extra_files,
    fsync_fd,
    pwrite_all,
    write_error,
    write_small_file,
)

__all__ = [
    "FileLayout",
    "MemorySource",
    "OutFile",
    "SourceFiles",
    "WriteResult",
    "atomic_folder",
    "coalesce_reads",
    "copy_extra_files",
    "parse_size",
    "piece_bytes",
    "record_original",
    "render_index",
    "restore_layout",
    "shard_by_size",
    "tensor_from_pieces",
    "transform_bytes",
    "write_checkpoint",
]

ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses are multiples of this
BUFFER = 4 << 20  # per worker; the device's largest request on our machines (max_sectors_kb 4096)
TASK_BYTES = 64 << 20
# O_DIRECT for whole blocks where the filesystem allows it (the output must reach the disk before the rename
# anyway); "0" writes everything through the page cache, as on filesystems without O_DIRECT (measurements only).
DIRECT = os.environ.get("AUTOMODEL_CONVERT_DIRECT", "1") != "0"


_fallocate = libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def preallocate(fd: int, size: int) -> None:
    """Give a new output file its full size: fallocate(2) where the filesystem has it (contiguous blocks, and a
    full disk fails here, before any byte is copied), else ftruncate (sparse). Never glibc's posix_fallocate
    emulation, which writes every block."""
    if _fallocate is not None and size > 0:
        if _fallocate(fd, 0, 0, size) == 0:
            return
        err = ctypes.get_errno()
        if err in NO_SPACE:
            raise OSError(err, os.strerror(err))
    os.ftruncate(fd, size)


_sync_file_range = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to start writing a just-written page-cache range to disk now (asynchronously), so that the
    fsync before the final rename waits for the tail only instead of the whole checkpoint. Best effort."""
    if FSYNC and _sync_file_range is not None and n > 0:
        _sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)


class Shard:
    """One output file being written: a buffered descriptor (header, partial blocks, fsync) and, where the
    filesystem allows it, an O_DIRECT one for whole aligned blocks."""

    def __init__(self, path: Path, mode: int, header: bytes, size: int) -> None:
        self.name = path.name
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.dfd: int | None = None
        try:
            if DIRECT and hasattr(os, "O_DIRECT"):  # opened before the (maybe read-only) source mode is applied
                try:
                    self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
                except OSError:
                    self.dfd = None  # the filesystem has no O_DIRECT (tmpfs, some FUSE): the page cache it is
            os.fchmod(self.fd, mode)
            pwrite_all(self.fd, header, 0)
            preallocate(self.fd, size)
        except BaseException:
            if self.dfd is not None:
                os.close(self.dfd)
            os.close(self.fd)
            raise

    def write_blocks(self, view: memoryview, off: int) -> None:
        """Whole aligned blocks from an aligned buffer."""
        if self.dfd is not None:
            try:
                pwrite_all(self.dfd, view, off)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._drop_direct()  # alignment this filesystem refuses: the page cache for the rest
        pwrite_all(self.fd, view, off)

    def write_part(self, view: memoryview, off: int) -> None:
        """A partial block (through the page cache)."""
        pwrite_all(self.fd, view, off)

    def written(self, off: int, n: int) -> None:
        """A range is complete: start write-back of what went through the page cache."""
        if self.dfd is None:
            start_writeback(self.fd, off, n)

    def _drop_direct(self) -> None:
        fd, self.dfd = self.dfd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        self._drop_direct()
        os.close(self.fd)


class RangeWriter:
    """Streams one contiguous output range through an aligned buffer: whole blocks go out with `write_blocks`, the
    partial blocks at the range's two ends with `write_part` (the neighbouring ranges own the rest of them)."""

    def __init__(self, shard: Shard, start: int, buf: memoryview) -> None:
        self.shard, self.buf = shard, buf
        self.base = start - start % ALIGN  # file offset of buf[0]
        self.pos = start - self.base  # buf[:pos] is in use (bytes before `first` belong to the previous range)
        self.first = start
        self.start = start

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def space(self) -> memoryview:
        """The free part of the buffer (never empty): fill a prefix of it, then `advance`."""
        if self.pos == len(self.buf):
            self._flush(final=False)
        return self.buf[self.pos :]

    def advance(self, n: int) -> None:
        self.pos += n

    def put(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        while mv:
            space = self.space()
            k = min(len(space), len(mv))
            space[:k] = mv[:k]
            self.advance(k)
            mv = mv[k:]

    def close(self) -> None:
        self._flush(final=True)
        self.shard.written(self.start, self.offset - self.start)

    def _flush(self, final: bool) -> None:
        end = self.offset
        lo = self.first
        a = -(-lo // ALIGN) * ALIGN  # first block boundary at or after our first byte
        b = end - end % ALIGN  # last block boundary at or before our last byte
        if a >= b:  # no whole block: only at the end of a short range
            if end > lo:
                self.shard.write_part(self.buf[lo - self.base : end - self.base], lo)
            self.first = end
            return
        if lo < a:
            self.shard.write_part(self.buf[lo - self.base : a - self.base], lo)
        self.shard.write_blocks(self.buf[a - self.base : b - self.base], a)
        if final:
            if end > b:
                self.shard.write_part(self.buf[b - self.base : end - self.base], b)
            self.first = end
            return
        tail = end - b  # < ALIGN <= b - base: the move never overlaps itself
        self.buf[:tail] = self.buf[b - self.base : end - self.base]
        self.base, self.pos, self.first = b, tail, b


def copy_range(source: SourceFiles | MemorySource, piece: Copy, out: RangeWriter, hasher: Hasher | None = None) -> None:
    """Copy one piece's source bytes into the output range, hashing them while they are in the buffer (one read
    of the source, one write, nothing allocated)."""
    done = 0
    while done < piece.n:
        view = out.space()[: piece.n - done]
        source.read_into(piece.key, piece.src + done, view)
        if hasher is not None:
            hasher.update(view)
        out.advance(len(view))
        done += len(view)


@dataclass
class WriteResult:
    files: list[str]
    tensors: int
    bytes_written: int
    extra_files: list[str]
    notes: list[str] = field(default_factory=list)
    checksums: dict | None = None


class WorkersStopped(Exception):
    """Raised in a worker that was told to stop (a signal or another task's error) before its next piece."""


Task = tuple[Shard, int, list]  # (output shard, first byte, [(out tensor, piece, tensor base offset)])


def _file_tasks(shard: Shard, of: OutFile, header_len: int, offsets: list[int]) -> list[Task]:
    """One output file's pieces in contiguous ranges of about `TASK_BYTES`."""
    tasks: list[Task] = []
    batch: list = []
    batch_bytes = 0
    for t, off in zip(of.tensors, offsets):
        for p in coalesce_reads(t.pieces):
            batch.append((t, p, header_len + off))
            batch_bytes += p.n
            if batch_bytes >= TASK_BYTES:
                tasks.append((shard, batch[0][2] + batch[0][1].dst, batch))
                batch, batch_bytes = [], 0
    if batch:
        tasks.append((shard, batch[0][2] + batch[0][1].dst, batch))
    return tasks


def _run_task(
    task: Task,
    source: SourceFiles | MemorySource,
    digests: Digests,
    progress: Callable[[int], None] | None,
    buffers: queue.SimpleQueue,
    stop: threading.Event,
) -> None:
    shard, start, batch = task
    buf = buffers.get()
    try:
        out = RangeWriter(shard, start, buf)
        for t, p, base in batch:
            if stop.is_set():
                raise WorkersStopped
            if base + p.dst != out.offset:
                raise AssertionError(f"internal error: the pieces of {shard.name!r} are not contiguous at {out.offset}")
            hasher, src_key, out_name = digests.hasher_for(t, p) if digests.active else (None, None, None)
            if isinstance(p, Copy):
                copy_range(source, p, out, hasher)
            else:
                data = transform_bytes(source.read, p)
                if hasher is not None:
                    hasher.update(data)
                out.put(data)
            digests.done(hasher, src_key, out_name)
            if progress:
                progress(p.n)
        out.close()
    finally:
        buffers.put(buf)


def _open_outputs(
    staging: Path, layout: FileLayout, file_mode: int, shards: list[Shard]
) -> tuple[list[list[Task]], dict[str, tuple[str, int]], int]:
    """Create every output shard (header written, full size allocated); their tasks, tensor placements, bytes."""
    per_file: list[list[Task]] = []
    placed: dict[str, tuple[str, int]] = {}
    total = 0
    for of in layout.files:
        header, offsets = encode_header([(t.name, t.dtype, t.shape) for t in of.tensors], of.metadata)
        size = len(header) + of.nbytes
        shard = Shard(staging / of.name, file_mode, header, size)
        shards.append(shard)
        total += size
        placed.update({t.name: (of.name, len(header) + off) for t, off in zip(of.tensors, offsets)})
        per_file.append(_file_tasks(shard, of, len(header), offsets))
    return per_file, placed, total


def _cpus() -> int:
    """Workers beyond the CPUs this process may use only contend (2 cores: merge 1.5 s with 2 workers, 2.0 s with
    4 in-process; 1.71 vs 1.77 s and split 1.61 vs 2.03 s through the CLI; the disk bounds the writes)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _run_pool(
    per_file: list[list[Task]],
    workers: int,
    source: SourceFiles | MemorySource,
    digests: Digests,
    progress: Callable[[int], None] | None,
) -> None:
    # round-robin over the output files: writes to one file serialize on its inode lock, so the workers should be
    # writing different files where there are several
    tasks = [t for group in itertools.zip_longest(*per_file) for t in group if t is not None]
    n = max(1, min(workers, _cpus(), len(tasks)))
    maps = [mmap.mmap(-1, BUFFER) for _ in range(n)]  # page-aligned, as O_DIRECT needs
    buffers: queue.SimpleQueue = queue.SimpleQueue()
    for m in maps:
        buffers.put(memoryview(m))
    stop = threading.Event()
    try:
        # Ctrl-C / SIGTERM while the workers run only sets `stop` (each quits at its next piece); the signal is
        # delivered again once every worker has stopped, so clean-up never races a worker still writing
        with signals_deferred(on_signal=stop.set):
            pool = ThreadPoolExecutor(max_workers=n)
            try:
                for _ in pool.map(lambda task: _run_task(task, source, digests, progress, buffers, stop), tasks):
                    pass
            finally:
                stop.set()  # an error in one task stops the others too
                pool.shutdown(wait=True, cancel_futures=True)
    except WorkersStopped:  # a signal stopped them and its own handler did not raise
        raise KeyboardInterrupt("interrupted") from None
    finally:
        while not buffers.empty():
            buffers.get().release()
        for m in maps:
            try:
                m.close()
            except BufferError:  # a view is still referenced (an exception's frames): the collector frees it
                pass


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
    source: MemorySource | None = None,
) -> WriteResult:
    """Write `plan`'s outputs as `layout`'s shards into `dst`, atomically.

    `record_checksums`: hash every source tensor while copying it and store the digests in the sidecar.
    `expected_checksums`: hash every output tensor and refuse (nothing written) if one differs from the record.
    `source`: the source tensors' bytes in memory (a state dict being saved; `ckpt` is then its virtual
    checkpoint, whose folder gives the non-weight files and permissions), instead of `ckpt`'s shards.
    """
    dst = Path(dst)
    check_names(layout, extra_files)
    notes: list[str] = []
    on_disk = source is None
    dir_mode, file_mode = source_modes(ckpt) if on_disk else (None, 0o644)
    files = SourceFiles(ckpt) if on_disk else source
    digests = Digests(ckpt, record_checksums, expected_checksums)
    src_root = ckpt.root if on_disk else None
    try:
        with atomic_folder(dst, overwrite, source=src_root, force=force, notes=notes, dir_mode=dir_mode) as staging:
            copied, total = _fill_staging(
                staging, dst, ckpt, layout, files, digests, file_mode=file_mode, copy_extras=on_disk,
                extra_files=extra_files, sidecar=sidecar, workers=workers, progress=progress,
            )
    finally:
        files.close()
    checks = digests.sources.sidecar_block() if digests.sources is not None else None
    return WriteResult(
        [of.name for of in layout.files], sum(len(of.tensors) for of in layout.files), total, copied, notes, checks
    )


def _fill_staging(
    staging: Path, dst: Path, ckpt: Checkpoint, layout: FileLayout, files: SourceFiles | MemorySource,
    digests: Digests, *, file_mode: int, copy_extras: bool, extra_files: dict[str, bytes] | None,
    sidecar: dict | None, workers: int, progress: Callable[[int], None] | None,
) -> tuple[list[str], int]:
    """Write the staging folder: non-weight files, shards (copied, fsynced, checked), index, sidecar.

    Returns (non-weight files copied from the source, total shard bytes); an OSError is reported against `dst`.
    """
    shards: list[Shard] = []
    try:
        copied = copy_extra_files(ckpt.root, staging, set(extra_files or ())) if copy_extras else []
        for name, data in (extra_files or {}).items():
            write_small_file(staging / name, data, file_mode)
        per_file, placed, total = _open_outputs(staging, layout, file_mode, shards)
        _run_pool(per_file, workers, files, digests, progress)
        for shard in shards:
            fsync_fd(shard.fd)
        hash_remaining_sources(files, digests)
        ckpt.check_unchanged()
        check_outputs(staging, layout, placed, digests)
        _write_index_and_sidecar(staging, layout, sidecar, digests, file_mode)
    except OSError as e:
        raise write_error(e, dst) from e
    finally:
        for shard in shards:
            shard.close()
        shards.clear()
    return copied, total


def _write_index_and_sidecar(
    staging: Path, layout: FileLayout, sidecar: dict | None, digests: Digests, file_mode: int
) -> None:
    """The index (when the layout has one) and the sidecar (with the source checksums when they were recorded)."""
    if layout.write_index:
        index = render_index(layout, sum(of.nbytes for of in layout.files)).encode()
        write_small_file(staging / INDEX_NAME, index, file_mode)
    if sidecar is not None:
        if digests.sources is not None:
            sidecar = {**sidecar, "checksums": digests.sources.sidecar_block()}
        write_small_file(staging / SIDECAR_NAME, (json.dumps(sidecar, indent=1) + "\n").encode(), file_mode)
