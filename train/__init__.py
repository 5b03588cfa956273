"""The expert-parallel fine-tuning trainer: `python -m automodel_convert.train` (console script `automodel-train`).

    automodel-train --model fixtures/qwen3_moe --tokenizer fixtures/chat --data fixtures/chat/chat.jsonl \\
        --seq 64 --steps 30 --lr 3e-3 --dtype float32 --device cpu --save runs/quick
    torchrun --nproc_per_node 8 -m automodel_convert.train --model Qwen/Qwen3-30B-A3B --ep 8 --data train.jsonl ...
    automodel-train --resume runs/quick/latest --steps 60
    automodel-train plot runs/quick

Modules: `config` (the one `TrainConfig` dataclass and the CLI generated from it), `checks` (everything checked before
the weights are read), `sources` + `data` (record formats, tokenization over ranks, packing), `masking` (block-causal
attention of packed documents), `control` (LR schedules, global gradient-norm clipping), `optim` (AdamW stepped inside
backward), `checkpoint` (DCP train state, resume anywhere, retention), `logs` (JSONL, TensorBoard, wandb, progress
line), `plot` (PNG charts), `trainer` (the `Trainer`), `cli` (`main`).
"""

from __future__ import annotations

from .cli import main, train
from .config import TrainArgs, TrainConfig, TrainError
from .trainer import Trainer

__all__ = ["Trainer", "TrainArgs", "TrainConfig", "TrainError", "main", "train"]
