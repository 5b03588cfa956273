"""Checks and estimates that run before any weight is read; each failure is a `TrainError` (one line, exit code 2).

Contract:
- `load_config(cfg)`: the model's `config.json` (`--num-layers` applied), or a one-line error.
- `check_run(cfg, config, world)`: ep divides the world, the type's record (`convert.spec.ModelSpec`) names a zoo
  model and no EP refusal (`ep_unsupported`), `--seq` fits
  `max_position_embeddings`, `--device cuda` has CUDA, `--overlap-optimizer` runs on one rank or with
  ep equal to the world size.
- `load_tokenizer(cfg, vocab_size)`: `--tokenizer` or the model's tokenizer; missing, degenerate (a vocabulary of one,
  a probe text that tokenizes to nothing or to one repeated id) or larger than the model's vocabulary is an error.
- `count_params`, `flops_per_token`, `check_memory`: parameter counts (E from the record's `num_experts`), model
  FLOPs, predicted per-GPU state memory.
- `human(n)`: a count as 1.2K / 3.4M / 5.6B.
"""

from __future__ import annotations

import math
from typing import Any

from .config import TrainConfig, TrainError

PROBE = "The quick brown fox jumps over the lazy dog. 0123456789"


def load_config(cfg: TrainConfig) -> Any:
    from transformers import AutoConfig

    from ..convert.source import resolve_source

    if not cfg.model:
        raise TrainError("--model is required (a hub id or a checkpoint folder; with --init random, a folder with config.json)")
    try:
        config = AutoConfig.from_pretrained(str(resolve_source(cfg.model, None)))
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise TrainError(f"--model {cfg.model}: cannot read its config.json ({str(e).splitlines()[0]})") from e
    if cfg.num_layers is not None:
        config.num_hidden_layers = cfg.num_layers
        for name in ("layer_types", "mlp_layer_types"):
            if isinstance(getattr(config, name, None), list):
                setattr(config, name, getattr(config, name)[: cfg.num_layers])
    return config


def check_run(cfg: TrainConfig, config: Any, world: int) -> None:
    import torch

    if world % cfg.ep:
        raise TrainError(f"--ep {cfg.ep} does not divide the world size {world}; choose ep from {[d for d in range(1, world + 1) if world % d == 0]}")
    _check_zoo_ep(config.model_type)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and cfg.seq > limit:
        raise TrainError(f"--seq {cfg.seq} is longer than the model allows (max_position_embeddings={limit}); use --seq {limit} or less")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is visible here; use --device cpu (or auto)")
    if cfg.overlap_optimizer and world != 1 and cfg.ep != world:
        raise TrainError(f"--overlap-optimizer with {world} ranks needs --ep {world} (experts on one rank each need no gradient reduction, "
                         "so they are updated inside backward); or drop --overlap-optimizer")
    if cfg.dispatcher == "deepep_static" and cfg.backend_config().experts not in ("auto", "grouped_mm"):
        raise TrainError(f"--dispatcher deepep_static pads its rows, which only the grouped-GEMM experts skip, not experts="
                         f"{cfg.backend_config().experts}: use --backend experts=grouped_mm or --dispatcher deepep")
    if cfg.backend_config().expert_recompute and (cfg.ac or cfg.cuda_graphs):
        raise TrainError("--backend expert_recompute=1 rebuilds the experts' saved activations in backward; it is not supported with "
                         + ("--ac (which recomputes the whole layer anyway)" if cfg.ac else "--cuda-graphs") + ": drop one of them")
    if cfg.cuda_graphs and cfg.data != "synthetic" and cfg.packing_mask == "document":
        raise TrainError("--cuda-graphs replays plain causal attention: add --packing-mask causal or use synthetic data")


def _check_zoo_ep(model_type: str) -> None:
    """The type's record names a zoo model and does not refuse expert parallelism."""
    from ..convert.registry import declared_spec, specs

    spec = declared_spec(model_type)
    if spec is None or spec.zoo is None:
        ok = sorted(name for name, s in specs().items() if s.zoo and not s.ep_unsupported)
        raise TrainError(f"model type {model_type!r} has no zoo model for expert-parallel training; supported: {', '.join(ok)}")
    if spec.ep_unsupported:
        raise TrainError(f"model type {model_type!r} has no expert-parallel support yet ({spec.ep_unsupported})")


def load_tokenizer(cfg: TrainConfig, vocab_size: int) -> Any:
    """The tokenizer for `--data` (None for synthetic data); see the module docstring."""
    if cfg.data == "synthetic" and not cfg.eval_data:
        return None
    import logging

    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.model
    flag = "--tokenizer" if cfg.tokenizer else "--model"
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - one line
        raise TrainError(f"{flag} {name}: no usable tokenizer ({str(e).splitlines()[0][:160]}); give one with --tokenizer") from e
    ids = tok(PROBE, add_special_tokens=False)["input_ids"]
    if len(tok) < 2 or len(set(ids)) < 2:
        raise TrainError(f"{flag} {name}: the tokenizer is degenerate (vocabulary {len(tok)}, the probe text becomes "
                         f"{len(ids)} token(s) of {len(set(ids))} id(s)); the checkpoint likely has no tokenizer files: "
                         "give one with --tokenizer")
    if len(tok) > vocab_size:
        raise TrainError(f"{flag} {name}: the tokenizer has {len(tok)} tokens but the model's vocabulary is {vocab_size}")
    return tok


def meta_model(config: Any, backend: Any) -> Any:
    import torch

    from ..models import get_model_class

    with torch.device("meta"):
        return get_model_class(config.model_type)(config, backend)


def count_params(model: Any) -> tuple[int, int, int]:
    """(total, expert, active-for-FLOPs) parameter counts of a (meta) model; embeddings are not FLOPs."""
    from ..convert.registry import declared_spec
    from ..parallel.expert_parallel import experts_modules

    experts = {id(p) for _, m in experts_modules(model) for p in m.parameters(recurse=False)}
    c = model.config
    spec = declared_spec(c.model_type)
    e = (spec.num_experts(c) if spec is not None else None) or 1
    k = getattr(c, "num_experts_per_tok", 1)
    total = expert = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if id(p) in experts:
            expert += p.numel()
            active += p.numel() * k // e
        elif "embed_tokens" not in name and p.dim() >= 2:
            active += p.numel()
    return total, expert, active


def flops_per_token(config: Any, active_params: int, seq: int) -> float:
    """6 x active parameters plus causal attention scores (QK^T and AV, forward + backward)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6 * active_params + 6 * config.num_hidden_layers * heads * head_dim * seq


def check_memory(total: int, world: int, param_bytes: int, device: Any) -> float:
    """Predicted GiB per GPU of sharded parameters, gradients and AdamW state; an error if it cannot fit."""
    import torch

    need = total * 4 * param_bytes / world  # parameter, gradient, two AdamW moments (in the parameter dtype)
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        if need > 0.92 * have:
            raise TrainError(f"parameters + gradients + optimizer state need {need / 2**30:.1f} GiB per GPU (of {have / 2**30:.0f} GiB) before activations; use more GPUs")
    return need / 2**30


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{1 if n / div < 100 else 0}f}{unit}"
    return f"{n:.0f}"


def fmt_seconds(s: float) -> str:
    s = max(0, int(math.ceil(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
