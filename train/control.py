"""Learning-rate schedules and global gradient-norm clipping over expert-parallel + FSDP2 parameters.

Contract:
- `lr_at(cfg, step)`: linear warmup over `--warmup` steps from lr/warmup to lr, then `--lr-schedule` constant (lr),
  linear or cosine (lr down to `--min-lr`, default lr/10, reached at `--steps`). `step` counts from 0.
- `global_grad_norm(params)`: the 2-norm of all gradients of the model as one vector. Every gradient element lives on
  exactly one rank (dense FSDP2 DTensors are `Shard(0)` over dp; expert DTensors `Shard(0)` over the ranks holding
  the same experts, and those ranks hold different experts along ep; unwrapped experts are distinct per ep rank), so
  the norm is sqrt(all-reduce-sum over ranks of each rank's local sum of squares). Computed in fp32.
- `clip_grads(params, max_norm)`: scales every local gradient by min(1, max_norm / (norm + 1e-6)) (torch's rule);
  returns the norm before clipping.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    floor = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.lr_schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * frac
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def _local(g: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return g.to_local() if isinstance(g, DTensor) else g


def _grad_groups(params: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """This rank's (local) gradients, grouped by device and dtype for the fused multi-tensor kernels."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = _local(p.grad)
            if g.numel():
                groups.setdefault((g.device, g.dtype), []).append(g)
    return list(groups.values())


def global_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every gradient over all ranks: local shards' squared norms (fp32, one multi-tensor kernel per
    device and dtype, no host sync), summed over the world (shards and expert slices are disjoint across ranks)."""
    import torch.distributed as dist

    groups = _grad_groups(params)
    device = groups[0][0].device if groups else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for grads in groups:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        sq = sq + torch.stack(norms).to(device).square().sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return sq.sqrt()


def clip_grads(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    params = list(params)
    norm = global_grad_norm(params)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grads in _grad_groups(params):
        torch._foreach_mul_(grads, scale.to(grads[0].device, grads[0].dtype))
    return norm
