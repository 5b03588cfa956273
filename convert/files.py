"""Which output files a conversion writes: shard layouts (fresh by size, or the recorded original), the index text,
and what `merge` records so that `split` can restore the source's own shards.

Contract: a `FileLayout` lists the output shards (`OutFile`: name, tensors in file order, per-file metadata) and
whether an index is written; `shard_by_size` fills shards in order up to a byte limit, `restore_layout` rebuilds the
layout `record_original` recorded, `render_index` gives the index file's text (the recorded original verbatim when
it still describes the files), `check_names` refuses any output name that is not a plain, distinct file name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .checkpoint import INDEX_NAME, Checkpoint, is_plain_file_name
from .errors import ConvertError
from .pieces import OutTensor


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



def check_names(layout: FileLayout, extra_files: dict[str, bytes] | None) -> None:
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


