"""Where training records come from: `--data` resolved to a record iterator, checked before the model loads.

Contract:
- `resolve(spec)` -> `Source(kind, where)`, kind one of: "synthetic"; "jsonl" (`.jsonl`/`.json` lines); "txt" (one
  record per non-empty line); "parquet" (a `.parquet` file or a folder of them); "hf_disk" (a folder written by
  `datasets`' `save_to_disk`); "hf_folder" (a local dataset folder laid out as on the hub: data files (.jsonl, .json,
  .csv, .txt, .parquet) at any depth, or a README.md with `configs`, for `datasets.load_dataset(folder)`); "hf_hub"
  (a dataset name for `datasets.load_dataset`). A path that looks like a file
  (it has a suffix or a slash) and does not exist is a `TrainError`, one line, before the model is read.
- `records(source, split, streaming)` yields dicts in file order. HF sources take `--data-split`; hub datasets
  stream with `--data-streaming`.
- `shard(source, split, streaming, rank, world)` yields `(i, record)` for this rank's records only, i = the record's
  index in file order, i % world == rank (the split `data.tokenize` gathers back into file order). Other ranks'
  records are skipped unread where the format allows: JSONL lines are counted, not parsed; parquet rows are taken
  from each Arrow batch before conversion; a map-style HF dataset is `select`ed; a streamed one (`--data-streaming`
  with "hf_hub" or "hf_folder") is iterated and skipped. `datasets` and `pyarrow` are optional extras (`pip install 'automodel-convert[data]'`);
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
DATA_FILES = (".jsonl", ".json", ".csv", ".txt", ".parquet")  # what datasets.load_dataset(folder) reads


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
        if any(path.glob("*.parquet")) and not any(p.suffix.lower() in DATA_FILES for p in path.rglob("*") if p.suffix != ".parquet"):
            return Source("parquet", spec)
        if (path / "README.md").is_file() or any(p.suffix.lower() in DATA_FILES for p in path.rglob("*") if p.is_file()):
            return Source("hf_folder", spec)
        raise TrainError(f"{flag} {spec}: a folder that is neither a saved HF dataset nor holds data files ({', '.join(DATA_FILES)})")
    if path.is_file():
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise TrainError(f"{flag} {spec}: unknown file type {path.suffix!r}; use .jsonl, .txt or .parquet")
        return Source(kind, spec)
    if path.suffix or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise TrainError(f"{flag} {spec}: no such file or folder")
    return Source("hf_hub", spec)


def records(src: Source, split: str = "train", streaming: bool = False) -> Iterator[dict[str, Any]]:
    for _, rec in shard(src, split, streaming):
        yield rec


def shard(src: Source, split: str = "train", streaming: bool = False, rank: int = 0, world: int = 1) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(index, record)` of the records with index % world == rank, in file order (module docstring)."""
    if src.kind == "jsonl":
        yield from _jsonl(Path(src.where), rank, world)
    elif src.kind == "txt":
        with open(src.where, encoding="utf-8") as f:
            i = 0
            for line in f:
                if line.strip():
                    if i % world == rank:
                        yield i, {"text": line.rstrip("\n")}
                    i += 1
    elif src.kind == "parquet":
        yield from _parquet(Path(src.where), rank, world)
    elif src.kind in ("hf_disk", "hf_folder", "hf_hub"):
        yield from _hf(src, split, streaming, rank, world)
    else:
        raise TrainError(f"--data {src.where}: no records for kind {src.kind}")


def _jsonl(path: Path, rank: int, world: int) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        i = 0
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            i += 1
            if (i - 1) % world != rank:
                continue  # another rank's record: counted, not parsed
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"--data {path}:{n}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise TrainError(f"--data {path}:{n}: expected a JSON object per line")
            yield i - 1, rec


def _parquet(path: Path, rank: int, world: int) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TrainError("--data *.parquet needs pyarrow: pip install 'automodel-convert[data]'") from None
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    start = 0
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            first = (rank - start) % world  # this rank's first row in the batch
            own = list(range(first, batch.num_rows, world))
            if own:
                yield from zip((start + j for j in own), batch.take(own).to_pylist())
            start += batch.num_rows


def _hf(src: Source, split: str, streaming: bool, rank: int, world: int) -> Iterator[tuple[int, dict[str, Any]]]:
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
    if isinstance(ds, datasets.Dataset):  # map-style: read only this rank's rows
        own = range(rank, len(ds), world)
        yield from zip(own, ds.select(own) if world > 1 else ds)
        return
    it = iter(enumerate(ds))  # streamed: every rank iterates, each keeps its share
    while True:
        try:
            i, rec = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a file that fails while streaming: one line
            raise TrainError(f"--data {src.where}: reading the stream failed ({str(e).splitlines()[0][:200]})") from None
        if i % world == rank:
            yield i, rec
