"""Where a run's metrics go: JSON lines (every step), TensorBoard and wandb (every `--log-every` steps), the console.

Contract:
- `Sinks(cfg, rank, resumed_step)`: on rank 0 only. `metrics.jsonl` (`--metrics`, default `<save>/metrics.jsonl`)
  gets one row per step; on resume rows past the resumed step are cut first, so steps never repeat.
  `--tensorboard DIR|auto` writes scalars with `torch.utils.tensorboard`; `--wandb PROJECT` logs to wandb (optional
  extra; `WANDB_MODE=offline` works without a network), its files under `<save>` when saving.
- `progress_line(m, total, eta_s, cuda)`: `step 12/100 | loss 3.21 | lr 1.0e-04 | grad-norm 0.84 | 2,345 tok/s ...
  | ETA 0:01:10`. Throughput is per GPU with TFLOP/s and MFU on CUDA; on CPU only the run's tokens/s (no FLOP
  figures, which mean nothing there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import cut_metrics
from .checks import fmt_seconds
from .config import TrainConfig, TrainError

CHARTED = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "peak_mem_gib",
           "expert_load_max_over_mean", "aux_loss")


class Sinks:
    def __init__(self, cfg: TrainConfig, rank: int, resumed_step: int | None, run_name: str) -> None:
        self.cfg, self.rank = cfg, rank
        self.jsonl = self.tb = self.wandb = None
        if rank != 0:
            return
        path = Path(cfg.metrics) if cfg.metrics else (Path(cfg.save) / "metrics.jsonl" if cfg.save else None)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_step is not None:
                cut_metrics(path, resumed_step)
            self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            where = Path(cfg.save or ".") / "tensorboard" if cfg.tensorboard == "auto" else Path(cfg.tensorboard)
            self.tb = SummaryWriter(str(where), purge_step=resumed_step + 1 if resumed_step is not None else None)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise TrainError("--wandb needs the wandb package: pip install 'automodel-convert[wandb]'") from None
            self.wandb = wandb.init(project=cfg.wandb, name=run_name, dir=cfg.save or None, config={k: v for k, v in vars(cfg).items() if k != "extra"},
                                    mode=os.environ.get("WANDB_MODE", "online"), resume="allow", id=run_name)

    def write(self, m: dict[str, Any], log: bool) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(m) + "\n")
            self.jsonl.flush()
        if not log:
            return
        scalars = {k: v for k, v in m.items() if k in CHARTED and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, m["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=m["step"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_line(m: dict[str, Any], total: int, eta_s: float, cuda: bool) -> str:
    parts = [f"step {m['step']:>{len(str(total))}}/{total}", f"loss {m['loss']:.4f}"]
    if "eval_loss" in m:
        parts.append(f"eval {m['eval_loss']:.4f}")
    parts.append(f"lr {m['lr']:.2e}")
    if "grad_norm" in m:
        parts.append(f"grad-norm {m['grad_norm']:.3f}")
    if cuda:
        parts.append(f"{m['tokens_per_s_per_gpu']:,.0f} tok/s/GPU | {m['tflops_per_gpu']:.1f} TFLOP/s | MFU {100 * m['mfu']:.1f}%")
        parts.append(f"peak {m['peak_mem_gib']:.1f} GiB")
    else:
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if "expert_load_max_over_mean" in m:
        parts.append(f"load max/mean {m['expert_load_max_over_mean']:.2f}")
    parts.append(f"ETA {fmt_seconds(eta_s)}")
    return " | ".join(parts)
