"""Per-tensor checksums: recorded by `merge`, checked by `verify` and `split`.

Contract: a checksum is the hex digest of one tensor's raw bytes (as stored, row-major, little endian), computed
while the bytes stream through the engine. The algorithm is `xxh3_128` (the `xxhash` package) where installed,
else `sha256` (hashlib); the sidecar records which, so a checkpoint merged with one is checked with the same.
The sidecar block is `{"algorithm": ..., "tensors": {source key: hex digest}}`.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Protocol

from .errors import ConvertError

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
