"""Where a plan's bytes come from: source shards on disk or tensors in memory, read by byte range.

Contract:
- `SourceFiles(ckpt)` opens source shards lazily; `read_into(key, off, dest)` fills `dest` with tensor `key`'s bytes
  `[off, off + len(dest))` (`preadv` at explicit offsets, safe across threads, no allocation), `read` returns them
  as bytes. A shard whose size, mtime or inode differs from when its header was read is refused
  (`Checkpoint.check_file`); an I/O error is reported as a problem of the source, never of the destination; a
  short file is a truncated shard.
- `MemorySource(tensors)` serves the same two calls from `name -> memoryview` (a state dict being saved).
- `transform_bytes` runs one `Transform` (one expert, bit-exact integer views); `coalesce_reads` merges Copy pieces
  contiguous in source and destination; `tensor_from_pieces` materialises one output tensor (`load_state_dict`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .errors import ConvertError
from .ops import from_bytes, to_bytes
from .pieces import Copy, OutTensor, Transform

if TYPE_CHECKING:
    import torch


def _source_preadv(fd: int, view: memoryview, off: int) -> int:
    """`os.preadv` on a source file (the one seam every source read goes through; fault-injection tests wrap it)."""
    return os.preadv(fd, [view], off)


def read_source_into(fd: int, view: memoryview, off: int, what: str) -> int:
    """Read up to `len(view)` source bytes into `view`; an I/O error is reported as a problem of the source."""
    try:
        return _source_preadv(fd, view, off)
    except OSError as e:
        raise ConvertError(
            f"cannot read the source ({what}: {e.strerror or e}); check the source files and their disk"
        ) from e


class SourceFiles:
    """Open source shards lazily; reads at explicit offsets are safe across threads."""

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

    def read_into(self, key: str, off: int, dest: memoryview) -> None:
        """Fill `dest` with bytes `[off, off + len(dest))` of source tensor `key`."""
        fd, pos = self.locate(key, off)
        done, n = 0, len(dest)
        while done < n:
            k = read_source_into(fd, dest[done:], pos + done, self.ckpt.tensors[key].file)
            if k == 0:
                raise ConvertError(
                    f"{self.ckpt.tensors[key].file}: ended early while reading {key!r}; the shard is truncated, re-download it"
                )
            done += k
        with self._lock:
            self.bytes_read += n

    def read(self, key: str, off: int, n: int) -> bytes:
        buf = bytearray(n)
        self.read_into(key, off, memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class MemorySource:
    """Source tensors held in memory (`name -> memoryview` of their raw bytes): the state dict being saved."""

    def __init__(self, tensors: Mapping[str, memoryview]) -> None:
        self.tensors = tensors
        self.bytes_read = 0

    def read_into(self, key: str, off: int, dest: memoryview) -> None:
        dest[:] = self.tensors[key][off : off + len(dest)]

    def read(self, key: str, off: int, n: int) -> bytes:
        return bytes(self.tensors[key][off : off + n])

    def close(self) -> None:
        pass


def transform_bytes(src: Callable[[str, int, int], bytes], piece: Transform) -> bytes:
    """Run one Transform: read its inputs, apply its chain on integer views (bit-exact), return the selected output."""
    xs = [from_bytes(src(k, off, n), shape, piece.itemsize) for k, off, n, shape in piece.inputs]
    out = piece.chain.apply(xs)[piece.select]
    return to_bytes(out)


def piece_bytes(files: SourceFiles, piece: Copy | Transform) -> bytes:
    if isinstance(piece, Copy):
        return files.read(piece.key, piece.src, piece.n)
    return transform_bytes(files.read, piece)


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
    view = memoryview(buf)
    for p in t.pieces:
        if isinstance(p, Copy):
            files.read_into(p.key, p.src, view[p.dst : p.dst + p.n])
        else:
            view[p.dst : p.dst + p.n] = transform_bytes(files.read, p)
    if t.nbytes == 0:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(t.shape)
