"""Safetensors headers and byte ranges, read and written without the `safetensors` package's full-file loads.

Contract:
- `read_header(path)` parses and validates one `.safetensors` file from its header alone (no tensor data is read):
  header length inside the file, valid JSON, UTF-8 names, known dtypes, shapes and offsets that are JSON integers,
  `prod(shape) * itemsize == end - begin`, offsets inside the data area, tensors tiling the data area exactly (no
  overlap, no gap, no trailing bytes), file not truncated: what the safetensors library itself accepts. Anything else raises `ConvertError` (one line).
- `TensorInfo.start` is the ABSOLUTE byte offset of the tensor's data in its file, so a tensor's bytes are
  `file[start : start + nbytes]`, row-major (C order), little endian, exactly as safetensors stores them.
- `encode_header(entries, metadata)` builds a header byte string identical to what the Rust `safetensors` writer
  produces for the same tensors in the same order (compact JSON, `__metadata__` first, padded with spaces to a
  multiple of 8), so files we write are byte-for-byte what `safetensors.torch.save_file` would write.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError

# The one dtype table: safetensors dtype name -> (item size in bytes, torch dtype attribute name)
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "F64": (8, "float64"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
}
DTYPE_SIZES: dict[str, int] = {name: size for name, (size, _) in DTYPES.items()}


def torch_dtype(name: str):  # noqa: ANN201 - torch.dtype; torch is imported only here (header code needs none)
    """The torch dtype of a safetensors dtype name (F8_E8M0 as uint8 where torch lacks float8_e8m0fnu)."""
    import torch

    return getattr(torch, DTYPES[name][1], torch.uint8)


def safetensors_dtype(dtype) -> str | None:  # noqa: ANN001 - a torch.dtype
    """The safetensors dtype name of a torch dtype, or None if safetensors cannot store it."""
    attr = str(dtype).removeprefix("torch.")
    return next((name for name, (_, a) in DTYPES.items() if a == attr), None)


MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `file` (name relative to the checkpoint folder), absolute `start`, `nbytes`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    """One parsed safetensors file: tensors in data order, its `__metadata__`, sizes."""

    file: str
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None
    header_len: int
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def read_header(path: str | os.PathLike[str], name: str | None = None) -> FileHeader:
    """Parse and validate the header of one safetensors file (reads at most the header's bytes)."""
    path = Path(path)
    name = name or path.name
    size, header_len, raw = _read_raw_header(path, name)
    header, metadata = _decode_header(name, raw)
    data_start = 8 + header_len
    infos = [_tensor_info(name, key, entry, data_start, size - data_start) for key, entry in header.items()]
    infos.sort(key=lambda t: (t.start, t.nbytes))
    _check_no_overlap(name, infos)
    _check_tiling(name, infos, data_start, size)
    return FileHeader(name, tuple(infos), metadata, header_len, size)


def _read_raw_header(path: Path, name: str) -> tuple[int, int, bytes]:
    """(file size, header length, header bytes), the length checked against the file and the limit before reading."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(
                    f"{name}: truncated safetensors file ({size} bytes, the 8-byte header length is missing); re-download or re-save it"
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ConvertError(
                    f"{name}: header length {header_len} is larger than the file ({size} bytes): the file is truncated or not safetensors; re-download it"
                )
            if header_len > MAX_HEADER_BYTES:
                raise ConvertError(
                    f"{name}: header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte safetensors limit; the file is corrupt"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise ConvertError(f"{name}: cannot read ({e.strerror}); check the path and its permissions") from e
    return size, header_len, raw


def _decode_header(name: str, raw: bytes) -> tuple[dict, dict[str, str] | None]:
    """The header's tensor entries and its `__metadata__` (None when absent)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(
            f"{name}: the safetensors header is not valid JSON ({e}); the file is corrupt, re-download it"
        ) from e
    if not isinstance(header, dict):
        raise ConvertError(f"{name}: the safetensors header is not a JSON object; the file is corrupt, re-download it")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ConvertError(f"{name}: `__metadata__` must map strings to strings; the file is corrupt")
    return header, metadata


def _tensor_info(name: str, key: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    """One validated header entry: known dtype, size matching its shape, inside the data area."""
    dtype, shape, (begin, end) = _parse_entry(name, key, entry)
    if dtype not in DTYPE_SIZES:
        raise ConvertError(
            f"{name}: tensor {key!r} has dtype {dtype!r}, which this tool does not support ({', '.join(DTYPE_SIZES)})"
        )
    if any(d < 0 for d in shape) or begin < 0 or end < begin:
        raise ConvertError(
            f"{name}: tensor {key!r} has invalid shape or offsets {list(shape)} {[begin, end]}; the file is corrupt"
        )
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise ConvertError(
            f"{name}: tensor {key!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {nbytes}; the file is corrupt"
        )
    if end > data_len:
        raise ConvertError(
            f"{name}: tensor {key!r} ends at byte {end} of a {data_len}-byte data area: the file is truncated or its offsets are outside the data; re-download it"
        )
    return TensorInfo(key, dtype, shape, name, data_start + begin, nbytes)


def _check_no_overlap(name: str, infos: list[TensorInfo]) -> None:
    """No two tensors (sorted by start) share a byte."""
    for a, b in zip(infos, infos[1:]):
        if b.start < a.start + a.nbytes:
            raise ConvertError(
                f"{name}: tensors {a.name!r} and {b.name!r} overlap in the data area; the file is corrupt, re-download it"
            )


def _is_json_int(x: object) -> bool:
    return type(x) is int  # not bool, not a string of digits, not a float


def _parse_entry(name: str, key: str, entry: object) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """dtype, shape and offsets of one header entry, refused the way the safetensors library refuses them."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConvertError(
            f"{name}: a tensor name is not valid UTF-8 ({key.encode('utf-8', 'backslashreplace')[:60]!r}); the file is corrupt"
        ) from e
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise ConvertError(f"{name}: tensor {key!r} has a malformed header entry (no dtype); the file is corrupt")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_json_int(d) for d in shape):
        raise ConvertError(f"{name}: tensor {key!r} has shape {shape!r}, not a list of integers; the file is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_json_int(x) for x in offsets):
        raise ConvertError(
            f"{name}: tensor {key!r} has data_offsets {offsets!r}, not two integers; the file is corrupt"
        )
    return entry["dtype"], tuple(shape), (offsets[0], offsets[1])


def _check_tiling(name: str, infos: list[TensorInfo], data_start: int, size: int) -> None:
    """The tensors cover the data area exactly: no gap, nothing after the last one (as the safetensors library requires)."""
    pos = data_start
    for t in infos:
        if t.start != pos:
            raise ConvertError(
                f"{name}: the data area has a gap before tensor {t.name!r}; the file is corrupt, re-download it"
            )
        pos += t.nbytes
    if pos != size:
        raise ConvertError(
            f"{name}: {size - pos} trailing bytes after the last tensor; the file is corrupt or was appended to, re-download it"
        )


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[int]]:
    """Header bytes (with the 8-byte length prefix) for tensors laid out back to back in `entries` order.

    Returns the header and each tensor's offset relative to the data area. Matches the Rust writer byte for byte.
    """
    obj: dict[str, object] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
