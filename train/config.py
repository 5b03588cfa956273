"""The trainer's one configuration: `TrainConfig`, keyword-only, validated in `__post_init__`, and the CLI built from it.

Contract:
- Every field is one `--option` of `automodel-train` (underscores become dashes); its `help` (and `choices`) live in
  the field's metadata, so the CLI is generated, never retyped (torchtitan's `config/` shape). Booleans are
  `--x/--no-x` pairs (a flag restored on resume can be turned off).
- `__post_init__` checks everything that needs neither the model's config nor the world: a bad value is a
  `TrainError` (one line, exit code 2, before any weight is read). Checks that need the model (ep dividing the world,
  sequence length, memory) run in `train/checks.py`.
- `RESUME_TAKEN` are the fields a resumed run takes from `trainer.json` where not given; of them `RESUME_FIXED` may
  not change (`merge_resumed` refuses a conflicting one in one line) and `RESUME_SHAPE` (ep, dispatcher, backend,
  ac, ...) may (the trainer refuses a restored one that cannot run here, e.g. an ep not dividing the world, in one
  line naming the flag that changes it). `explicit(cfg)` are the options given on the command line, else the fields
  set away from their default (`ep` defaults to None: "1, or the resumed run's").
- `TrainArgs` is the same class (older name).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}
SCHEDULES = ("constant", "linear", "cosine")


class TrainError(ValueError):
    """Bad arguments or an impossible run, found before any work: one line, exit code 2."""


def opt(default: Any, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:  # noqa: A002
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass(kw_only=True)
class TrainConfig:
    # model and data
    model: str = opt("", "hub id or checkpoint folder (any supported layout)")
    tokenizer: str | None = opt(None, "tokenizer folder or hub id (default: the model's)")
    data: str = opt("synthetic", "JSONL (text | messages | prompt+completion | input_ids), .txt, .parquet, an HF dataset "
                    "folder or hub name, or 'synthetic'")
    data_split: str = opt("train", "split of an HF dataset")
    data_field: str | None = opt(None, "record field holding the text or the messages (default: detected)")
    data_streaming: bool = opt(False, "stream an HF hub dataset instead of downloading it whole")
    eval_data: str | None = opt(None, "evaluation data, any --data format")
    eval_every: int = opt(0, "evaluate every N steps (and after the last; needs --eval-data)")
    packing_mask: str = opt("document", "document: attention stays inside each packed document (block-causal); causal: "
                            "plain causal over the window", ("document", "causal"))
    doc_attention: str = opt("auto", "the kernel of --packing-mask document: auto (varlen_attn, flash per document, on CUDA in "
                             "bf16/fp16 for layers without sliding window or sinks; else sdpa with an explicit block-causal "
                             "mask; the trainer says which), varlen (refuse where it cannot run), mask (the explicit mask)",
                             ("auto", "varlen", "mask"))
    # shape of the run
    ep: int | None = opt(None, "expert-parallel degree, dividing the number of ranks (default 1, or on --resume the run's)")
    seq: int = opt(4096, "sequence length")
    batch: int = opt(1, "sequences per rank per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    steps: int = opt(100, "total optimizer steps")
    # optimizer
    lr: float = opt(1e-5, "peak learning rate")
    lr_schedule: str = opt("cosine", "learning-rate schedule after warmup", SCHEDULES)
    warmup: int = opt(0, "linear warmup steps")
    min_lr: float | None = opt(None, "final learning rate of linear/cosine (default lr/10)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    aux_loss_coef: float | None = opt(None, "router load-balancing loss coefficient (default: the config's, on only if "
                                      "output_router_logits; 0 turns it off)")
    router_bias_rate: float = opt(0.0, "aux-loss-free bias update rate of sigmoid (DeepSeek-style) routers (0: off)")
    seed: int = opt(0, "random seed")
    # checkpoints
    save: str | None = opt(None, "run folder (step-N subfolders, metrics.jsonl)")
    save_every: int = opt(0, "save every N steps (and after the last)")
    keep_last: int = opt(0, "keep only the last N step folders (0: all)")
    save_layout: str = opt("original", "expert layout of the saved HF model", ("original", "fused"))
    resume: str | None = opt(None, "a step-N folder, or RUN/latest")
    # execution
    device: str = opt("auto", "auto (cuda when available), cuda or cpu (gloo)", ("auto", "cuda", "cpu"))
    dtype: str = opt("bfloat16", "parameter dtype", tuple(DTYPES))
    reduce_dtype: str = opt("auto", "gradient reduce dtype: auto (bf16 where bit-identical to fp32: groups of 2 ranks "
                            "with bf16 parameters; else fp32), float32 or bfloat16", ("auto", "float32", "bfloat16"))
    init: str = opt("pretrained", "pretrained, or random (config only, benchmarks)", ("pretrained", "random"))
    num_layers: int | None = opt(None, "override num_hidden_layers (with --init random)")
    backend: str = opt("", "BackendConfig as key=value,...")
    dispatcher: str = opt("auto", "token dispatcher for ep > 1: auto, alltoall, deepep, deepep_static (DeepEP with no host sync, buffers "
                                   "sized for the worst case; checked with the mesh)")
    ac: bool = opt(False, "activation checkpointing per decoder layer")
    cuda_graphs: bool = opt(False, "experimental: CUDA graphs per decoder layer (one GPU, ep=1)")
    overlap_optimizer: bool = opt(False, "step AdamW per parameter inside backward (one rank, or the experts at ep = world; needs --grad-clip 0 and "
                                  "--grad-accum 1)")
    reshard_after_forward: bool = opt(True, "FSDP2: free gathered dense parameters after forward")
    # logging
    metrics: str | None = opt(None, "JSON-lines metrics file (default <save>/metrics.jsonl)")
    log_every: int = opt(1, "print (and send to TensorBoard/wandb) every N steps; metrics.jsonl gets every step")
    tensorboard: str | None = opt(None, "TensorBoard log folder ('auto': <save>/tensorboard)")
    wandb: str | None = opt(None, "wandb project (WANDB_MODE=offline works without a network)")
    peak_tflops: float = opt(790.0, "bf16 TFLOP/s per GPU that MFU is relative to (CUDA only)")
    quiet: bool = opt(False, "print nothing per step")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.ep is None and not self.resume:
            self.ep = 1  # on --resume it stays None until `merge_resumed` takes the run's
        for name in ("ep", "seq", "batch", "steps", "grad_accum", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainError(f"--{dash(name)} {getattr(self, name)}: must be at least 1")
        for name in ("warmup", "save_every", "keep_last", "eval_every"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{dash(name)} {getattr(self, name)}: must not be negative")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise TrainError(f"--{dash(f.name)} {getattr(self, f.name)!r}: use one of {', '.join(choices)}")
        if self.lr <= 0 or self.grad_clip < 0 or self.weight_decay < 0 or self.router_bias_rate < 0:
            raise TrainError("--lr must be positive; --grad-clip, --weight-decay and --router-bias-rate must not be negative")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise TrainError(f"--min-lr {self.min_lr}: must lie between 0 and --lr {self.lr}")
        if self.aux_loss_coef is not None and self.aux_loss_coef < 0:
            raise TrainError(f"--aux-loss-coef {self.aux_loss_coef}: must not be negative")
        if self.overlap_optimizer and self.grad_clip > 0:
            raise TrainError("--overlap-optimizer updates each parameter inside backward, before the global gradient norm "
                             "exists: add --grad-clip 0 (or drop --overlap-optimizer)")
        if self.overlap_optimizer and self.grad_accum > 1:
            raise TrainError("--overlap-optimizer cannot accumulate gradients: use --grad-accum 1")
        if self.doc_attention != "auto" and self.packing_mask != "document":
            raise TrainError(f"--doc-attention {self.doc_attention} is the kernel of --packing-mask document: drop one of them")
        if self.doc_attention == "varlen" and (DTYPES[self.dtype] == "float32" or self.device == "cpu"):
            raise TrainError("--doc-attention varlen runs varlen_attn, a CUDA kernel for bf16/fp16: use --dtype bfloat16 on "
                             "CUDA, or --doc-attention auto")
        if self.eval_every and not self.eval_data:
            raise TrainError("--eval-every needs --eval-data")
        if self.save and self.init == "random":
            raise TrainError("--save needs a checkpoint to save against; drop --init random")
        if self.num_layers is not None and self.init != "random":
            raise TrainError("--num-layers changes the architecture; use it with --init random")
        self.backend_config()  # a bad --backend is one line here, not a TypeError later
        import importlib.util

        for flag, module, extra in ((self.wandb, "wandb", "wandb"), (self.tensorboard, "tensorboard", "tensorboard")):
            if flag and importlib.util.find_spec(module) is None:
                raise TrainError(f"--{module} needs the {module} package: pip install 'automodel-convert[{extra}]'")

    def backend_config(self):  # noqa: ANN201 - models.BackendConfig
        from ..models import BackendConfig

        if not self.backend:
            return BackendConfig()
        try:
            kw = dict(kv.split("=", 1) for kv in self.backend.split(",") if kv)
        except ValueError:
            raise TrainError(f"--backend {self.backend!r}: use key=value pairs separated by commas (e.g. attn=sdpa)") from None
        names = {f.name for f in fields(BackendConfig)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TrainError(f"--backend: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if "compile" in kw:
            kw["compile"] = kw["compile"].lower() in ("1", "true", "yes")
        if "loss_chunk_tokens" in kw:
            kw["loss_chunk_tokens"] = int(kw["loss_chunk_tokens"])
        try:
            return BackendConfig(**kw)
        except (TypeError, ValueError) as e:
            raise TrainError(f"--backend {self.backend!r}: {str(e).splitlines()[0]}") from None


TrainArgs = TrainConfig

# what a resumed run takes from trainer.json: RESUME_FIXED may not change (a conflicting value is refused), the rest
# of RESUME_TAKEN is taken where not given; RESUME_SHAPE is how the run executes (the ep degree, dispatcher, kernels,
# activation checkpointing, ...), restored like the rest and changeable (DCP reshards the train state to any ep).
# Not restored: --device, --resume, and the logging sinks (--metrics, --tensorboard, --wandb, --quiet, --peak-tflops).
RESUME_FIXED = ("model", "tokenizer", "data", "data_split", "data_field", "packing_mask", "seq", "batch", "grad_accum",
                "lr", "lr_schedule", "warmup", "min_lr", "weight_decay", "grad_clip", "aux_loss_coef", "router_bias_rate",
                "seed", "dtype", "init", "num_layers", "save_layout", "eval_data")
RESUME_SHAPE = ("ep", "dispatcher", "backend", "ac", "cuda_graphs", "overlap_optimizer", "reshard_after_forward", "doc_attention",
                "data_streaming")
RESUME_TAKEN = RESUME_FIXED + ("save", "steps", "save_every", "keep_last", "eval_every", "log_every") + RESUME_SHAPE


def dash(name: str) -> str:
    return name.replace("_", "-")


def explicit(cfg: TrainConfig) -> set[str]:
    """What the user asked for: the options given on the command line (`extra["given"]`, set by `parse`), else the
    fields set away from their default."""
    if "given" in cfg.extra:
        return set(cfg.extra["given"])
    return {f.name for f in fields(cfg) if f.metadata.get("cli", True) and getattr(cfg, f.name) != f.default}


def merge_resumed(cfg: TrainConfig, saved: dict[str, Any], where: str) -> TrainConfig:
    """`cfg` with the saved run's arguments where the user gave none; a conflicting fixed one is a TrainError."""
    given = explicit(cfg)
    for name in RESUME_FIXED:
        if name in given and name in saved and saved[name] != getattr(cfg, name):
            raise TrainError(f"--resume {where}: the run was trained with --{dash(name)} {saved[name]}, not "
                             f"{getattr(cfg, name)}; drop --{dash(name)} (a resumed run keeps it) or start a new run")
    updates = {n: saved[n] for n in RESUME_TAKEN if n in saved and n not in given}
    if updates.get("ep", cfg.ep) is None:
        updates["ep"] = 1  # a trainer.json without ep
    return dataclasses.replace(cfg, **updates)


def restored_shape(cfg: TrainConfig, saved: dict[str, Any]) -> dict[str, Any]:
    """The run-shape arguments a resume takes from trainer.json (not given), with the run's values."""
    given = explicit(cfg)
    return {n: saved[n] for n in RESUME_SHAPE if n in saved and n not in given}


# ---------------------------------------------------------------- CLI generated from the dataclass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        raise TrainError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="automodel-train", allow_abbrev=False, description="Expert-parallel MoE fine-tuning (run under torchrun for several "
                "GPUs). `automodel-train plot RUN` draws a run's charts.")
    for f in fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        name, meta = f"--{dash(f.name)}", f.metadata
        if f.type in ("bool", bool):  # --x/--no-x: a resumed run's restored flag can be turned off
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        p.add_argument(name, type=kind, default=f.default, choices=meta.get("choices"), help=meta["help"])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parse(argv: list[str]) -> tuple[TrainConfig, bool]:
    ns = vars(build_parser().parse_args(argv))
    debug = ns.pop("debug")
    names = {f.name for f in fields(TrainConfig)}
    given = sorted({a[2:].split("=", 1)[0].replace("-", "_").removeprefix("no_") for a in argv if a.startswith("--")} & names)
    return TrainConfig(**ns, extra={"given": given}), debug
