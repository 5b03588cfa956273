"""Training data for `automodel_convert.train`: packed JSON-lines text or synthetic tokens, resumable.

Contract:
- `PackedJsonl(path, tokenizer, seq, dp_rank, dp_size)`: reads `{"text": ...}` lines, tokenizes with the checkpoint's
  tokenizer (EOS appended after every document), packs the stream into fixed `seq + 1` token windows (inputs are the
  first `seq`, labels the last `seq`), and gives window `i` to data-parallel rank `i % dp_size`. Deterministic.
- `Synthetic(vocab, seq, seed, dp_rank)`: uniform random tokens (benchmarks), a fresh batch per step.
- Both expose `state_dict()` / `load_state_dict()` (position in the stream) so a resumed run sees exactly the batches
  an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch


class Synthetic:
    def __init__(self, vocab_size: int, seq: int, batch: int = 1, seed: int = 0, dp_rank: int = 0, device: str | torch.device = "cpu") -> None:
        self.vocab_size, self.seq, self.batch, self.seed, self.dp_rank, self.device = vocab_size, seq, batch, seed, dp_rank, device
        self.step = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.dp_rank * 7919 + self.step)
        tokens = torch.randint(0, self.vocab_size, (self.batch, self.seq + 1), generator=g)
        self.step += 1
        tokens = tokens.to(self.device)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class PackedJsonl:
    def __init__(self, path: str | Path, tokenizer, seq: int, batch: int = 1, dp_rank: int = 0, dp_size: int = 1, device: str | torch.device = "cpu") -> None:  # noqa: ANN001
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--data {path}: no such file; give a JSON-lines file of {{'text': ...}} records or 'synthetic'")
        self.tokenizer, self.seq, self.batch, self.dp_rank, self.dp_size, self.device = tokenizer, seq, batch, dp_rank, dp_size, device
        self.windows = self._pack()
        if len(self.windows) < dp_size * batch:
            raise ValueError(f"--data {path}: only {len(self.windows)} windows of {seq + 1} tokens; need at least {dp_size * batch} (one batch per rank)")
        self.index = 0  # windows consumed by this rank

    def _pack(self) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        stream: list[int] = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"--data {self.path}:{n}: expected a JSON object with a 'text' field ({e})") from e
                stream.extend(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                if eos is not None:
                    stream.append(eos)
        w = self.seq + 1
        return [stream[i : i + w] for i in range(0, len(stream) - w + 1, w)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch):
            global_i = (self.index * self.dp_size + self.dp_rank) % len(self.windows)  # epochs wrap around
            rows.append(self.windows[global_i])
            self.index += 1
        tokens = torch.tensor(rows, dtype=torch.long, device=self.device)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": "jsonl", "path": str(self.path), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])
