"""Where training records come from: `--data` resolved to a record iterator, checked before the model loads.

Contract:
- `resolve(spec)` -> `Source(kind, where)`, kind one of: "synthetic"; "jsonl" (`.jsonl`/`.json` lines); "txt" (one
  record per non-empty line); "parquet" (a `.parquet` file or a folder of them); "hf_disk" (a folder written by
  `datasets`' `save_to_disk`); "hf_hub" (a dataset name for `datasets.load_dataset`). A path that looks like a file
  (it has a suffix or a slash) and does not exist is a `TrainError`, one line, before the model is read.
- `records(source, split, streaming)` yields dicts in file order. HF sources take `--data-split`; hub datasets
  stream with `--data-streaming`. `datasets` and `pyarrow` are optional extras (`pip install 'automodel-convert[data]'`);
  a missing one is a one-line error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainError

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    kind: str
    where: str


def resolve(spec: str, flag: str = "--data") -> Source:
    if spec == "synthetic":
        return Source("synthetic", spec)
    path = Path(spec)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return Source("hf_disk", spec)
        if any(path.glob("*.parquet")):
            return Source("parquet", spec)
        raise TrainError(f"{flag} {spec}: a folder that is neither a saved HF dataset nor holds .parquet files")
    if path.is_file():
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise TrainError(f"{flag} {spec}: unknown file type {path.suffix!r}; use .jsonl, .txt or .parquet")
        return Source(kind, spec)
    if path.suffix or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise TrainError(f"{flag} {spec}: no such file or folder")
    return Source("hf_hub", spec)


def records(src: Source, split: str = "train", streaming: bool = False) -> Iterator[dict[str, Any]]:
    if src.kind == "jsonl":
        yield from _jsonl(Path(src.where))
    elif src.kind == "txt":
        with open(src.where, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield {"text": line.rstrip("\n")}
    elif src.kind == "parquet":
        yield from _parquet(Path(src.where))
    elif src.kind in ("hf_disk", "hf_hub"):
        yield from _hf(src, split, streaming)
    else:
        raise TrainError(f"--data {src.where}: no records for kind {src.kind}")


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"--data {path}:{n}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise TrainError(f"--data {path}:{n}: expected a JSON object per line")
            yield rec


def _parquet(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TrainError("--data *.parquet needs pyarrow: pip install 'automodel-convert[data]'") from None
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _hf(src: Source, split: str, streaming: bool) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise TrainError(f"--data {src.where}: HF datasets need the datasets library: pip install 'automodel-convert[data]'") from None
    try:
        if src.kind == "hf_disk":
            ds = datasets.load_from_disk(src.where)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise TrainError(f"--data {src.where}: no split {split!r}; --data-split one of {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(src.where, split=split, streaming=streaming)
    except TrainError:
        raise
    except Exception as e:  # noqa: BLE001 - one line
        raise TrainError(f"--data {src.where}: cannot load the dataset ({str(e).splitlines()[0][:200]})") from None
    yield from ds
