"""Training data: records -> (token ids, target mask) examples -> packed windows with document boundaries, resumable.

Contract:
- `to_example(record, tokenizer, field)` -> `(ids, mask)`, `mask[i]` True where token i is a training target:
  - `{"input_ids": [...], "labels"?: [...]}`: pre-tokenized (targets where labels != -100; all without labels);
  - `{"messages": [...]}`: the tokenizer's chat template; targets are the assistant turns' tokens only (each turn's
    span is found by rendering the conversation up to it with and without the turn, so no `{% generation %}` markers
    are needed);
  - `{"prompt": ..., "completion": ...}`: prompt + completion + EOS, targets on completion + EOS;
  - `{"text": ...}` (and .txt lines): text + EOS, all targets. `--data-field` names the field to read instead.
- `tokenize(records, ...)`: rank r tokenizes records r, r + W, ... only (a progress bar on rank 0): `records` is
  either `sources.shard(...)` (`(index, record)` pairs of this rank's share, the others never read) or every record
  (the rank keeps its share). The ranks exchange their parts as compact tensors (ids int32/int64, target mask, record
  lengths and indices) and every rank holds the same `Stream` (tokens, target mask, document index) in record order:
  the stream, hence the windows and their order, is the same at every world size. A mistake in any rank's records
  (bad JSON, an unknown record shape) is raised on every rank, with the first rank's message, never a hang.
- `Packed(stream, seq, batch, rank, world, seed)`: windows of `seq + 1` tokens (inputs the first `seq`, targets the
  last `seq`). A target counts only if its token is a target and belongs to the same document as its input, so no
  loss crosses a boundary; `position_ids` restart at every document start; `doc_ids` give the block-causal mask
  (`train/masking.py`). Window order is a seeded permutation per epoch. Each micro-batch takes the next `W * batch`
  windows of that order, rank r the r-th `batch` of them. The position (`state_dict()`) is global: a resumed run at
  the same or another world size continues where the saved one stopped.
- `Synthetic`: uniform random tokens (benchmarks), keyed by the same global position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import TrainError


def _text(t: str, tok: Any) -> list[int]:
    return tok(t, add_special_tokens=False)["input_ids"]


def chat_example(messages: list[dict], tok: Any) -> tuple[list[int], list[bool]]:
    if not getattr(tok, "chat_template", None):
        raise TrainError("--data has 'messages' records but the tokenizer has no chat template; give one with --tokenizer")
    render = lambda ms, gen=False: tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start, end = render(messages[:i], True) if i else "", render(messages[: i + 1])
        if not (full.startswith(end) and end.startswith(start)):
            raise TrainError("the chat template does not render conversations prefix by prefix; cannot find the assistant turns")
        spans.append((len(start), len(end)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def to_example(rec: dict, tok: Any, field: str | None) -> tuple[list[int], list[bool]]:
    eos = [tok.eos_token_id] if tok is not None and tok.eos_token_id is not None else []
    if field is not None:
        if field not in rec:
            raise TrainError(f"--data-field {field}: not in the record (fields: {', '.join(rec)})")
        value = rec[field]
        rec = {"messages": value} if isinstance(value, list) and value and isinstance(value[0], dict) else (
            {"input_ids": value} if isinstance(value, list) else {"text": value})
    if "input_ids" in rec:
        ids = [int(i) for i in rec["input_ids"]]
        labels = rec.get("labels")
        return ids, [lab != -100 for lab in labels] if labels is not None else [True] * len(ids)
    if tok is None:
        raise TrainError("text records need a tokenizer")
    if "messages" in rec:
        return chat_example(rec["messages"], tok)
    if "prompt" in rec and "completion" in rec:
        p, c = _text(rec["prompt"], tok), _text(rec["completion"], tok) + eos
        return p + c, [False] * len(p) + [True] * len(c)
    if "text" in rec:
        ids = _text(rec["text"], tok) + eos
        return ids, [True] * len(ids)
    raise TrainError(f"a record with fields {', '.join(rec) or 'none'}: expected text, messages, prompt+completion or input_ids (or --data-field)")


@dataclass
class Stream:
    tokens: torch.Tensor  # int64 [N]
    mask: torch.Tensor  # bool [N]: token is a target
    doc: torch.Tensor  # int64 [N]: document index


def tokenize(recs: Any, tok: Any, field: str | None, rank: int, world: int, vocab_size: int, show: bool) -> Stream:
    """Every rank's copy of the whole stream, each rank having tokenized 1/W of the records (see module docstring)."""
    from tqdm import tqdm

    index: list[int] = []
    lengths: list[int] = []
    ids_all: list[int] = []
    mask_all: list[bool] = []
    error = None
    bar = tqdm(desc="tokenizing" + (f" (each of {world} ranks its share)" if world > 1 else ""), unit=" records", disable=not show,
               mininterval=0.5)
    try:
        for i, rec in _indexed(recs, rank, world):
            ids, mask = to_example(rec, tok, field)
            if ids:
                index.append(i)
                lengths.append(len(ids))
                ids_all += ids
                mask_all += mask
            bar.update(1)
    except Exception as e:  # every rank must hear of it: the others would wait in the exchange
        if world == 1:
            raise
        error = str(e) if isinstance(e, TrainError) else f"rank {rank} could not tokenize its records: {type(e).__name__}: {e}"
    finally:
        bar.close()
    wide = max(ids_all, default=0) >= 2**31 or min(ids_all, default=0) < 0
    mine = {"error": error, "index": torch.tensor(index, dtype=torch.long), "lengths": torch.tensor(lengths, dtype=torch.long),
            "tokens": torch.tensor(ids_all, dtype=torch.long if wide else torch.int32), "mask": torch.tensor(mask_all, dtype=torch.bool)}
    parts = _gather(mine, world)
    errors = [p["error"] for p in parts if p["error"]]
    if errors:
        raise TrainError(errors[0])
    index_t = torch.cat([p["index"] for p in parts])
    if index_t.numel() == 0:
        raise TrainError("the data holds no records")
    order = torch.argsort(index_t)
    lengths_t = torch.cat([p["lengths"] for p in parts])[order]
    pieces = [(t, m) for p in parts for t, m in zip(p["tokens"].long().split(p["lengths"].tolist()), p["mask"].split(p["lengths"].tolist()))]
    pieces = [pieces[k] for k in order.tolist()]
    tokens = torch.cat([t for t, _ in pieces])
    top = int(tokens.max())
    if top >= vocab_size or int(tokens.min()) < 0:
        raise TrainError(f"token id {top} is outside the model's vocabulary of {vocab_size}; does the tokenizer belong to the model?")
    mask = torch.cat([m for _, m in pieces])
    doc = torch.repeat_interleave(torch.arange(len(pieces)), lengths_t)
    return Stream(tokens, mask, doc)


def _indexed(recs: Any, rank: int, world: int) -> Any:
    """`(index, record)` of this rank's share: `recs` as `sources.shard` gives them, or every record (then kept by
    index % world)."""
    it = iter(recs)
    first = next(it, None)
    if first is None:
        return
    if isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], int):
        yield first
        yield from it
        return
    for i, rec in enumerate(_chain(first, it)):
        if i % world == rank:
            yield i, rec


def _chain(first: Any, rest: Any) -> Any:
    yield first
    yield from rest


def _gather(mine: Any, world: int) -> list:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [mine]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return parts


def window_fields(tokens: torch.Tensor, mask: torch.Tensor, doc: torch.Tensor) -> dict[str, torch.Tensor]:
    """One `seq + 1` window -> inputs, targets (-100 where not trained), positions and document ids of the inputs."""
    d = doc[:-1]
    targets = torch.where(mask[1:] & (doc[1:] == d), tokens[1:], torch.full_like(tokens[1:], -100))
    idx = torch.arange(d.numel())
    start = torch.ones_like(d, dtype=torch.bool)
    start[1:] = d[1:] != d[:-1]
    seg_start = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
    return {"input_ids": tokens[:-1], "shift_labels": targets, "position_ids": idx - seg_start, "doc_ids": d - d[0]}


class Packed:
    """Packed windows over a `Stream`, the global position resumable (see the module docstring)."""

    def __init__(self, stream: Stream, seq: int, batch: int, rank: int, world: int, seed: int = 0, device: Any = "cpu", shuffle: bool = True) -> None:
        self.stream, self.seq, self.batch, self.rank, self.world, self.seed, self.device = stream, seq, batch, rank, world, seed, device
        self.shuffle = shuffle
        self.n = stream.tokens.numel() // (seq + 1)
        if self.n < 1:
            raise TrainError(f"the data holds {stream.tokens.numel()} tokens: fewer than one window of --seq {seq} + 1")
        self.position = 0  # windows consumed by all ranks together
        self._perm: tuple[int, torch.Tensor] | None = None

    def window(self, k: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(k, self.n)
        if self.shuffle:
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)))
            i = int(self._perm[1][i])
        s = slice(i * (self.seq + 1), (i + 1) * (self.seq + 1))
        return window_fields(self.stream.tokens[s], self.stream.mask[s], self.stream.doc[s])

    def next_batch(self) -> dict[str, torch.Tensor]:
        first = self.position + self.rank * self.batch
        rows = [self.window(first + j) for j in range(self.batch)]
        self.position += self.world * self.batch
        return {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """Every window once, in order; all ranks get the same number of batches (windows past the end: no targets)."""
        out = []
        per = self.world * self.batch
        for base in range(0, self.n, per):
            rows = []
            for j in range(self.batch):
                k = base + self.rank * self.batch + j
                w = window_fields(*(t[(k % self.n) * (self.seq + 1) : (k % self.n + 1) * (self.seq + 1)] for t in (self.stream.tokens, self.stream.mask, self.stream.doc)))
                if k >= self.n:
                    w["shift_labels"] = torch.full_like(w["shift_labels"], -100)
                rows.append(w)
            out.append({k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]})
        return out

    def state_dict(self) -> dict:
        return {"kind": "packed", "position": self.position, "windows": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class Synthetic:
    """Uniform random tokens, keyed by (seed, global window index): the same windows at any world size."""

    def __init__(self, vocab_size: int, seq: int, batch: int = 1, seed: int = 0, rank: int = 0, world: int = 1, device: Any = "cpu") -> None:
        self.vocab_size, self.seq, self.batch, self.seed, self.rank, self.world, self.device = vocab_size, seq, batch, seed, rank, world, device
        self.position = 0

    def next_batch(self) -> dict[str, torch.Tensor | None]:
        first = self.position + self.rank * self.batch
        rows = [torch.randint(0, self.vocab_size, (self.seq + 1,), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + first + j))
                for j in range(self.batch)]
        self.position += self.world * self.batch
        tokens = torch.stack(rows).to(self.device)
        return {"input_ids": tokens[:, :-1], "shift_labels": tokens[:, 1:], "position_ids": None, "doc_ids": None}

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
