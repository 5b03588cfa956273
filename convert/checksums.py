"""Per-tensor checksums: recorded by `merge`, checked by `verify` and `split`.

Contract: a checksum is the hex digest of one tensor's raw bytes (as stored, row-major, little endian), computed
while the bytes stream through the engine. The algorithm is `xxh3_128` (the `xxhash` package) where installed,
else `sha256` (hashlib); the sidecar records which, so a checkpoint merged with one is checked with the same.
The sidecar block is `{"algorithm": ..., "tensors": {source key: hex digest}}`.
`Digests` is what the writer hashes: whole source tensors (recorded by `merge`) and whole output tensors (checked by
`split`); tensors that no single piece covers are hashed afterwards by one sequential read each.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import ConvertError
from .pieces import Copy, OutTensor, Transform

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .files import FileLayout
    from .sources import SourceFiles

CHUNK = 4 << 20

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a declared dependency; hashlib is the fallback
    xxhash = None

DEFAULT_ALGORITHM = "xxh3_128" if xxhash is not None else "sha256"


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Hasher:
    if algorithm == "xxh3_128":
        if xxhash is None:
            raise ConvertError("the checksums were recorded with xxh3_128; pip install xxhash to check them")
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ConvertError(f"unknown checksum algorithm {algorithm!r} in automodel_convert.json; the sidecar is corrupt")


def digest(data: bytes, algorithm: str = DEFAULT_ALGORITHM) -> str:
    h = new_hasher(algorithm)
    h.update(data)
    return h.hexdigest()


class DigestBook:
    """Thread-safe name -> hex digest, filled by the writer threads."""

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM) -> None:
        self.algorithm = algorithm
        self.digests: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, name: str, hexdigest: str) -> None:
        with self._lock:
            self.digests[name] = hexdigest

    def sidecar_block(self) -> dict:
        return {"algorithm": self.algorithm, "tensors": dict(self.digests)}


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


def hash_remaining_sources(files: SourceFiles, digests: Digests) -> None:
    """Source tensors that no single piece covered (fused sources read per expert): one sequential read each."""
    if digests.sources is None:
        return
    buf = memoryview(bytearray(CHUNK))
    for key, info in files.ckpt.tensors.items():
        if key not in digests.sources.digests:
            h = new_hasher(digests.algorithm)
            for off in range(0, info.nbytes, CHUNK):
                view = buf[: min(CHUNK, info.nbytes - off)]
                files.read_into(key, off, view)
                h.update(view)
            digests.sources.add(key, h.hexdigest())


def check_outputs(staging: Path, layout: FileLayout, placed: dict[str, tuple[str, int]], digests: Digests) -> None:
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
