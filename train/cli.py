"""`automodel-train`: parse the `TrainConfig` options, run the trainer, report mistakes in one line.

Contract: `main(argv)` returns the exit code: 0 after training (also after a SIGINT/SIGTERM stop that saved), 2 for
any bad input (`TrainError` and the other errors a user can cause: one line `automodel-train: error: ...` on stderr,
no traceback; `--debug` shows it). `automodel-train plot RUN [--out DIR]` writes PNG charts of `RUN/metrics.jsonl`.
`train(cfg)` runs a job (collective under torchrun) and returns rank 0's metrics history.
"""

from __future__ import annotations

import sys

from ..convert.errors import ConvertError
from .checks import human
from .config import TrainConfig, TrainError, parse


def banner(trainer) -> str:  # noqa: ANN001 - a Trainer
    cfg = trainer.cfg
    dev = trainer.device.type
    parts = [f"{trainer.config.model_type}: {human(trainer.total_params)} parameters ({human(trainer.expert_params)} in experts, "
             f"{human(trainer.active_params)} active per token)", f"world {trainer.world}, ep {cfg.ep}, dp {trainer.world}",
             f"seq {cfg.seq}, batch {cfg.batch} x accum {cfg.grad_accum} per rank", f"{cfg.dtype} on {dev}", f"dispatcher {trainer.dispatcher}",
             f"loaded in {trainer.load_seconds:.1f} s"]
    if dev == "cuda":
        parts.append(f"predicted state {trainer.state_gib:.1f} GiB/GPU")
    if trainer.doc_plan is not None:
        counts, why = trainer.doc_plan
        kernels = " + ".join(f"{k} {n}/{sum(counts.values())} layers" for k, n in counts.items())
        parts.append(f"documents: {kernels}" + (f" (not varlen: {'; '.join(why)})" if why else ""))
    if trainer.resume_path is not None:
        parts.append(f"resumed from {trainer.resume_path} at step {trainer.step_index}")
    return ", ".join(parts)


def train(cfg: TrainConfig) -> list[dict]:
    import torch.distributed as dist

    from .logs import progress_line
    from .trainer import Trainer

    trainer = Trainer(cfg)
    cfg = trainer.cfg
    loud = trainer.rank == 0 and not cfg.quiet
    if loud:
        print(banner(trainer), flush=True)

    def show(m: dict) -> None:
        if loud and (m["step"] % cfg.log_every == 0 or m["step"] == cfg.steps or "eval_loss" in m):
            print(progress_line(m, cfg.steps, m["eta_s"], trainer.device.type == "cuda"), flush=True)

    history = trainer.run(show)
    if dist.is_initialized():
        dist.barrier()
    if loud and trainer.stop_requested:
        print(f"stopped at step {trainer.step_index}" + ("" if cfg.save else " (nothing saved: no --save)"), flush=True)
    return history


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv[:1] == ["plot"]:
            from .plot import plot_main

            return plot_main(argv[1:])
        cfg, debug = parse(argv)
        train(cfg)
        return 0
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (TrainError, ValueError, FileNotFoundError, NotImplementedError, ConvertError, OSError, ImportError) as e:
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"automodel-train: error: {msg}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
