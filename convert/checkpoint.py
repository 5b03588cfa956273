"""Open a local checkpoint folder from its headers alone.

Contract: `open_checkpoint(folder)` reads `config.json`, `model.safetensors.index.json` (when present) and the header
of every safetensors shard, validates them (see `safetensors_io.read_header`; index paths must stay inside the
folder and name existing shards whose headers hold exactly the indexed keys) and returns a `Checkpoint`: every
tensor's file, dtype, shape and absolute byte range. No tensor data is read. Pickle checkpoints (`*.bin`, `*.pt`)
are refused, never loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import ConvertError
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

    @property
    def has_index(self) -> bool:
        return self.index_metadata is not None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def path(self, file: str) -> Path:
        return self.root / file


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
        raise ConvertError(f"{root / INDEX_NAME}: shard path {name!r} escapes the checkpoint folder; the index must name files inside it")
    return name


def open_checkpoint(root: str | Path, *, require_config: bool = True) -> Checkpoint:
    root = Path(root)
    if not root.exists():
        raise ConvertError(f"source {str(root)!r} does not exist; give a checkpoint folder or a hub repo id")
    if not root.is_dir():
        raise ConvertError(f"source {str(root)!r} is not a folder; give the folder that holds config.json and the safetensors shards")
    shard_paths = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
    index_path = root / INDEX_NAME
    if not shard_paths and not index_path.exists():
        pickles = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ConvertError(
                f"{root} holds only pickle checkpoints ({', '.join(pickles[:3])}); automodel-convert never unpickles: convert them to safetensors first (transformers: model.save_pretrained(dir))"
            )
        raise ConvertError(f"no .safetensors files in {root}; point at a checkpoint folder that holds safetensors shards")

    config: dict = {}
    if (root / "config.json").exists():
        config = _load_json(root / "config.json", "config.json")
    elif require_config:
        raise ConvertError(f"{root} has no config.json; copy the model's config.json next to the shards or pass --model-type")

    index_metadata = None
    weight_map: dict[str, str] | None = None
    if index_path.exists():
        index = _load_json(index_path, "the safetensors index")
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConvertError(f"{index_path}: no weight_map; fix the index or delete it to use the shards directly")
        weight_map = {str(k): _safe_shard_name(root, v) for k, v in wm.items()}
        index_metadata = index.get("metadata") or {}
        shard_names = sorted(set(weight_map.values()))
        for name in shard_names:
            if not (root / name).is_file():
                raise ConvertError(f"{index_path} names shard {name!r}, which is missing; re-download it or fix the index")
    else:
        shard_names = shard_paths

    files: dict[str, FileHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    for name in shard_names:
        header = read_header(root / name, name)
        files[name] = header
        for t in header.tensors:
            if weight_map is not None and weight_map.get(t.name) != name:
                where = weight_map.get(t.name)
                raise ConvertError(
                    f"{name}: tensor {t.name!r} is {'indexed under ' + repr(where) if where else 'not in the index'}; the index is stale: regenerate it"
                )
            if t.name in tensors:
                raise ConvertError(f"tensor {t.name!r} is stored twice ({tensors[t.name].file} and {name}); remove the duplicate shard")
            tensors[t.name] = t
    if weight_map is not None:
        missing = [k for k in weight_map if k not in tensors]
        if missing:
            raise ConvertError(f"{index_path}: {len(missing)} indexed tensors are missing from their shards (e.g. {missing[0]!r} in {weight_map[missing[0]]}); re-download the shards")

    sidecar = _load_json(root / SIDECAR_NAME, SIDECAR_NAME) if (root / SIDECAR_NAME).exists() else None
    return Checkpoint(root, files, tensors, config, index_metadata, sidecar)


def model_type_of(ckpt: Checkpoint, override: str | None) -> str:
    if override:
        return override
    mt = ckpt.config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ConvertError(f"{ckpt.root / 'config.json'} has no model_type; pass --model-type")
    return mt
