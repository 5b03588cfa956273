"""Open a local checkpoint folder from its headers alone.

Contract: `open_checkpoint(folder)` reads `config.json`, `model.safetensors.index.json` (when present) and the header
of every safetensors shard, validates them (see `safetensors_io.read_header`; index paths must stay inside the
folder and name existing shards whose headers hold exactly the indexed keys) and returns a `Checkpoint`: every
tensor's file, dtype, shape and absolute byte range. No tensor data is read. Pickle checkpoints (`*.bin`, `*.pt`)
are refused, never loaded.

The sidecar `automodel_convert.json` is validated on open (`validate_sidecar`): layouts are known names, recorded
shard names are plain `.safetensors` names inside the folder (no paths, no duplicates, not hidden), part shapes are
lists of non-negative integers, checksums map names to hex strings. Each shard's size, mtime and inode are
recorded when its header is read (`stamps`); `check_file` / `check_unchanged` refuse a shard that changed since.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import ConvertError
from .mapping import Layout
from .safetensors_io import FileHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SIDECAR_NAME = "automodel_convert.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    root: Path
    files: dict[str, FileHeader]  # shard name -> parsed header, in shard-name order
    tensors: dict[str, TensorInfo]  # key -> where it lives, in (shard, offset) order
    config: dict = field(default_factory=dict)
    index_metadata: dict | None = None  # the index's "metadata" block; None when the folder has no index
    sidecar: dict | None = None  # what automodel-convert recorded when it wrote this folder
    stamps: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # shard -> (dev, ino, size, mtime_ns)

    @property
    def has_index(self) -> bool:
        return self.index_metadata is not None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def path(self, file: str) -> Path:
        return self.root / file

    def check_file(self, file: str, st: os.stat_result) -> None:
        """Refuse a shard whose stat differs from when its header was read."""
        want = self.stamps.get(file)
        if want is not None and file_stamp(st) != want:
            raise ConvertError(
                f"source shard {file!r} changed while it was being converted (size, mtime or inode differ); make sure nothing writes to the source and run again"
            )

    def check_unchanged(self) -> None:
        for file in self.stamps:
            try:
                st = os.stat(self.path(file))
            except OSError as e:
                raise ConvertError(
                    f"source shard {file!r} disappeared while it was being converted ({e.strerror}); run again on a stable copy"
                ) from e
            self.check_file(file, st)


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def is_plain_file_name(name: object) -> bool:
    """A name that stays inside its folder: no separators, not hidden, not `.`/`..`, at most 255 bytes of UTF-8."""
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        return False
    try:
        return len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:
        return False


def load_config(folder: Path, *, required: bool, beside: str) -> dict:
    """`folder/config.json`, or {} when it is absent and not `required` (else one line: put it `beside` ...)."""
    if (folder / "config.json").exists():
        return _load_json(folder / "config.json", "config.json")
    if required:
        raise ConvertError(f"{folder} has no config.json; copy the model's config.json next to {beside} or pass --model-type")
    return {}


def _load_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read {what} ({e}); fix or remove the file") from e
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: {what} is not a JSON object; fix or remove the file")
    return obj


def _safe_shard_name(root: Path, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConvertError(f"{root / INDEX_NAME}: weight_map has a non-string file name {name!r}; fix the index")
    p = PurePosixPath(name)
    if p.is_absolute() or "\\" in name or any(part in ("..", "") for part in p.parts) or name.startswith("~"):
        raise ConvertError(
            f"{root / INDEX_NAME}: shard path {name!r} escapes the checkpoint folder; the index must name files inside it"
        )
    return name


def open_checkpoint(root: str | Path, *, require_config: bool = True) -> Checkpoint:
    root = Path(root)
    shard_paths = _list_shards(root)
    config = load_config(root, required=require_config, beside="the shards")
    weight_map, index_metadata = _read_index(root)
    shard_names = sorted(set(weight_map.values())) if weight_map is not None else shard_paths
    files, tensors, stamps = _read_shard_headers(root, shard_names, weight_map)
    if weight_map is not None:
        _check_index_complete(root / INDEX_NAME, weight_map, tensors)
    sidecar = _load_sidecar(root)
    return Checkpoint(root, files, tensors, config, index_metadata, sidecar, stamps)


def _list_shards(root: Path) -> list[str]:
    """The folder's `.safetensors` names, sorted; refuses a missing folder, a file, and a folder of pickles only."""
    if not root.exists():
        raise ConvertError(f"source {str(root)!r} does not exist; give a checkpoint folder or a hub repo id")
    if not root.is_dir():
        raise ConvertError(
            f"source {str(root)!r} is not a folder; give the folder that holds config.json and the safetensors shards"
        )
    shard_paths = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
    if not shard_paths and not (root / INDEX_NAME).exists():
        pickles = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ConvertError(
                f"{root} holds only pickle checkpoints ({', '.join(pickles[:3])}); automodel-convert never unpickles: convert them to safetensors first (transformers: model.save_pretrained(dir))"
            )
        raise ConvertError(
            f"no .safetensors files in {root}; point at a checkpoint folder that holds safetensors shards"
        )
    return shard_paths


def _read_index(root: Path) -> tuple[dict[str, str] | None, dict | None]:
    """The index's (weight_map, metadata), both None without an index; every named shard must exist in `root`."""
    index_path = root / INDEX_NAME
    if not index_path.exists():
        return None, None
    index = _load_json(index_path, "the safetensors index")
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise ConvertError(f"{index_path}: no weight_map; fix the index or delete it to use the shards directly")
    weight_map = {str(k): _safe_shard_name(root, v) for k, v in wm.items()}
    index_metadata = index.get("metadata") or {}
    for name in sorted(set(weight_map.values())):
        if not (root / name).is_file():
            raise ConvertError(
                f"{index_path} names shard {name!r}, which is missing; re-download it or fix the index"
            )
    return weight_map, index_metadata


def _read_shard_headers(
    root: Path, shard_names: list[str], weight_map: dict[str, str] | None
) -> tuple[dict[str, FileHeader], dict[str, TensorInfo], dict[str, tuple[int, int, int, int]]]:
    """Each shard's stamp and header, and every tensor once, where the index (if any) says it is."""
    files: dict[str, FileHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    stamps: dict[str, tuple[int, int, int, int]] = {}
    for name in shard_names:
        stamps[name] = file_stamp(os.stat(root / name))
        header = read_header(root / name, name)
        files[name] = header
        for t in header.tensors:
            if weight_map is not None and weight_map.get(t.name) != name:
                where = weight_map.get(t.name)
                raise ConvertError(
                    f"{name}: tensor {t.name!r} is {'indexed under ' + repr(where) if where else 'not in the index'}; the index is stale: regenerate it"
                )
            if t.name in tensors:
                raise ConvertError(
                    f"tensor {t.name!r} is stored twice ({tensors[t.name].file} and {name}); remove the duplicate shard"
                )
            tensors[t.name] = t
    return files, tensors, stamps


def _check_index_complete(index_path: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """Every indexed tensor was found in its shard."""
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise ConvertError(
            f"{index_path}: {len(missing)} indexed tensors are missing from their shards (e.g. {missing[0]!r} in {weight_map[missing[0]]}); re-download the shards"
        )


def _load_sidecar(root: Path) -> dict | None:
    """The validated sidecar, or None when the folder has none."""
    sidecar = _load_json(root / SIDECAR_NAME, SIDECAR_NAME) if (root / SIDECAR_NAME).exists() else None
    if sidecar is not None:
        validate_sidecar(sidecar, root / SIDECAR_NAME)
    return sidecar


class _Bad(Exception):
    pass


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Bad(what)


def _is_str_map(x: object) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items())


def _check_original(original: object) -> None:
    _need(isinstance(original, dict), "`original` is not an object")
    files = original.get("files")
    _need(isinstance(files, list) and bool(files), "`original.files` is not a non-empty list")
    seen: set[str] = set()
    for f in files:
        _need(isinstance(f, dict), "an `original.files` entry is not an object")
        name = f.get("name")
        _need(
            is_plain_file_name(name) and name.endswith(".safetensors"),
            f"recorded shard name {name!r} is not a plain .safetensors file name inside the folder",
        )
        _need(name not in seen, f"recorded shard name {name!r} appears twice")
        seen.add(name)
        keys = f.get("keys")
        _need(
            isinstance(keys, list) and all(isinstance(k, str) for k in keys),
            f"shard {name!r} has no list of tensor names",
        )
        _need(
            f.get("metadata") is None or _is_str_map(f.get("metadata")),
            f"shard {name!r} has metadata that is not strings",
        )
    _need(isinstance(original.get("has_index", True), bool), "`original.has_index` is not true/false")
    _need(
        original.get("index_text") is None or isinstance(original.get("index_text"), str),
        "`original.index_text` is not text",
    )
    _need(
        original.get("index_metadata") is None or isinstance(original.get("index_metadata"), dict),
        "`original.index_metadata` is not an object",
    )


def _check_parts(parts: object) -> None:
    _need(isinstance(parts, dict), "`parts` is not an object")
    for name, shapes in parts.items():
        ok = (
            isinstance(shapes, list)
            and bool(shapes)
            and all(isinstance(s, list) and all(type(d) is int and d >= 0 for d in s) for s in shapes)
        )
        _need(ok, f"`parts` of {name!r} is not a list of shapes")


def _check_checksums(checksums: object) -> None:
    _need(isinstance(checksums, dict) and isinstance(checksums.get("algorithm"), str), "`checksums` has no algorithm")
    _need(_is_str_map(checksums.get("tensors")), "`checksums.tensors` does not map names to digests")


def validate_sidecar(sidecar: dict, path: Path) -> None:
    """Every field `split`, `verify` and the planner read from the sidecar, checked for type and safety."""
    try:
        for field_name in ("layout", "original_layout"):
            value = sidecar.get(field_name)
            _need(value is None or value in {x.value for x in Layout}, f"`{field_name}` {value!r} is not a layout")
        _need(
            sidecar.get("model_type") is None or isinstance(sidecar.get("model_type"), str), "`model_type` is not text"
        )
        if sidecar.get("original") is not None:
            _check_original(sidecar["original"])
        if sidecar.get("parts") is not None:
            _check_parts(sidecar["parts"])
        if sidecar.get("checksums") is not None:
            _check_checksums(sidecar["checksums"])
    except _Bad as e:
        raise ConvertError(
            f"{path}: {e}; the sidecar was edited or is corrupt: restore it from the merge output, or delete it to split by model type"
        ) from e


