"""Expert parallelism + FSDP2 on one mesh for MoE models whose experts use transformers v5's fused layout.

Contract:
- Meshes (`TrainMeshes`, from `parallel.build_mesh(ep=...).train_meshes()`): `dp` spans all W ranks (every rank trains on its own data); `ep` (size `ep`) and `ep_dp`
  (size W/ep) factor the same ranks: rank = ep_dp_index * ep + ep_index. Ranks of one `ep` group hold different
  experts; ranks of one `ep_dp` group hold the same experts.
- `parallelize(model, meshes)` finds every experts module (3-D `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`
  parameters, forward `(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`: transformers v5's
  experts interface, which the zoo follows), keeps this rank's `Shard(0)` slice of its experts (torch.chunk rule;
  uneven E works), and routes tokens with a `Dispatcher` (all-to-all by default). Experts are then FSDP2-sharded
  over `ep_dp` when it has more than one rank (gradients reduced only among ranks holding the same experts; with
  ep == world nothing to reduce), dense parameters over `dp` (world > 1), with bf16 compute and fp32 gradient
  reduction. A single rank gets no FSDP wrapper (nothing to shard or reduce).
- Gradient scale: every rank's loss reaches the experts it routed to, so expert gradients sum W per-rank losses;
  FSDP averages over `ep_dp` (W/ep ranks), and an extra `1/ep` in the experts' backward makes the result the
  gradient of the mean loss, like the dense parameters.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .ep_dispatch import AllToAllDispatcher, Dispatcher, LocalDispatcher, expert_bounds


class ExpertParallelError(ValueError):
    """A model or configuration expert parallelism cannot handle (one line, says what to change)."""


@dataclass
class TrainMeshes:
    world: int
    ep: int
    dp: object  # DeviceMesh over all ranks, dim "dp"
    ep_mesh: object  # DeviceMesh, dim "ep"
    ep_dp_mesh: object  # DeviceMesh, dim "ep_dp"

    @property
    def ep_rank(self) -> int:
        return self.ep_mesh.get_local_rank()

    @property
    def ep_group(self):  # noqa: ANN201
        return self.ep_mesh.get_group()


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN205
        return g * ctx.scale, None


def grouped_swiglu(xs: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable) -> torch.Tensor:
    """SwiGLU experts over tokens sorted by expert: `counts[j]` rows for expert j. Grouped GEMM on CUDA.

    The weights always enter the autograd graph, even on a rank that holds no experts (torch.chunk's uneven rule
    can leave the last ranks empty) or receives no tokens: FSDP's post-backward (gradient reduction) must run at the
    same point on every rank, and every rank must join the backward all-to-alls, or ranks issue collectives in
    different orders and deadlock.
    """
    if gate_up.shape[0] == 0:
        # xs (no rows) stays in the graph too, so this rank takes part in the dispatch all-to-all's backward
        return xs.new_zeros((xs.shape[0], down.shape[1])) + (xs.sum() + (gate_up.sum() + down.sum()).to(xs.dtype)) * 0
    if xs.is_cuda and xs.dtype == torch.bfloat16:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(act(g) * u, down.transpose(-2, -1), offs=offs)
    outs = []  # reference path (CPU tests): one matmul per expert
    for j, chunk in enumerate(xs.split(counts.tolist())):
        g, u = (chunk @ gate_up[j].t()).chunk(2, dim=-1)
        outs.append((act(g) * u) @ down[j].t())
    return torch.cat(outs) if outs else xs.new_zeros((0, down.shape[1]))


def _zoo_experts_fn(mod: nn.Module, gate_up: torch.Tensor, down: torch.Tensor) -> Callable:
    """The zoo's grouped GEMM (models/common/experts.py back-ends) on this rank's experts, no host sync."""
    from ..models.common.experts import grouped_linear, swiglu

    def run(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if gate_up.shape[0] == 0:
            return grouped_swiglu(xs, counts, gate_up, down, mod.act_fn)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        ids = torch.repeat_interleave(torch.arange(counts.numel(), device=xs.device), counts.long(), output_size=xs.shape[0])
        h = grouped_linear(xs, gate_up.transpose(1, 2), offsets, ids, mod.impl)
        a = swiglu(h, None, mod.act_fn, mod.swiglu_impl)
        return grouped_linear(a, down.transpose(1, 2), offsets, ids, mod.impl)

    return run


def _ep_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    gate_up = _GradScale.apply(self.gate_up_proj, self._ep_grad_scale)
    down = _GradScale.apply(self.down_proj, self._ep_grad_scale)
    if getattr(self, "layout", None) == "concat" and hasattr(self, "run_grouped"):  # a zoo GroupedExperts
        experts_fn = _zoo_experts_fn(self, gate_up, down)
    else:  # transformers' experts class (fallback models): reference SwiGLU, grouped_mm on CUDA

        def experts_fn(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            return grouped_swiglu(xs, counts, gate_up, down, self.act_fn)

    _add_load(self, top_k_index)
    out = self._ep_dispatcher(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), experts_fn)
    return out.to(hidden_states.dtype)


def _add_load(mod: nn.Module, top_k_index: torch.Tensor) -> None:
    """Routed (token, slot) pairs per global expert, accumulated in place into a persistent buffer: no host sync
    (bincount on CUDA syncs) and correct under CUDA graph replay."""
    with torch.no_grad():
        flat = top_k_index.reshape(-1)
        buf = getattr(mod, "_ep_load", None)
        if buf is None or buf.device != flat.device:
            buf = mod._ep_load = torch.zeros(mod._ep_num_experts, dtype=torch.int64, device=flat.device)
        buf.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))


def _count_load(mod: nn.Module, args: tuple) -> None:
    _add_load(mod, args[1])


def expert_load(model: nn.Module, reset: bool = True) -> torch.Tensor | None:
    """Routed (token, slot) pairs per expert since the last call, `[layers, E]` summed over this rank's tokens."""
    loads = []
    for _, mod in experts_modules(model):
        if getattr(mod, "_ep_load", None) is not None:
            loads.append(mod._ep_load.clone())
            if reset:
                mod._ep_load.zero_()
    return torch.stack(loads) if loads else None


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, mod in model.named_modules():
        gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3:
            if getattr(mod, "has_bias", False) or getattr(mod, "is_transposed", False) or hasattr(mod, "gate_up_proj_bias"):
                raise ExpertParallelError(f"{name}: experts with biases or a transposed layout (gpt_oss style) have no expert-parallel support yet; use --ep 1")
            found.append((name, mod))
    return found


def shard_experts(model: nn.Module, ep: int, ep_rank: int, dispatcher_factory: Callable[[int], Dispatcher], grad_scale: float) -> list[nn.Module]:
    """Keep this rank's experts of every experts module and route through a dispatcher. Returns the modules."""
    mods = experts_modules(model)
    if not mods:
        raise ExpertParallelError(f"{type(model).__name__} has no fused experts modules (gate_up_proj/down_proj); this model type has no expert-parallel support")
    for _, mod in mods:
        E = mod.gate_up_proj.shape[0] if not hasattr(mod, "_ep_num_experts") else mod._ep_num_experts
        b = expert_bounds(E, ep)
        if not hasattr(mod, "_ep_num_experts"):
            mod.gate_up_proj = nn.Parameter(mod.gate_up_proj.data[b[ep_rank] : b[ep_rank + 1]].clone())
            mod.down_proj = nn.Parameter(mod.down_proj.data[b[ep_rank] : b[ep_rank + 1]].clone())
        mod._ep_num_experts = E
        if ep == 1 and getattr(mod, "layout", None) == "concat" and hasattr(mod, "run_grouped"):
            # a zoo GroupedExperts holding every expert: its own tuned forward; only count the routed load
            if not getattr(mod, "_ep_load_hook", False):
                mod.register_forward_pre_hook(_count_load)
                mod._ep_load_hook = True
            continue
        mod._ep_dispatcher = dispatcher_factory(E)
        mod._ep_grad_scale = grad_scale
        mod.forward = types.MethodType(_ep_forward, mod)
    return [m for _, m in mods]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.language_model.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ExpertParallelError(f"cannot find the decoder layers of {type(model).__name__}")


def parallelize(
    model: nn.Module,
    meshes: TrainMeshes,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    dispatcher: str = "alltoall",
) -> nn.Module:
    """Expert-shard, (optionally) checkpoint and FSDP2-wrap `model` in place; returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dispatcher == "deepep":
        import importlib.util

        if importlib.util.find_spec("deep_ep") is None:
            raise ExpertParallelError("dispatcher 'deepep' needs the deep-ep package (pip install 'automodel-convert[deepep]', Hopper GPUs with NVSHMEM); or use --dispatcher alltoall")
        raise ExpertParallelError("dispatcher 'deepep': the DeepEP dispatcher is not built in this version (docs/DEEPEP.md says why); use --dispatcher alltoall")
    if dispatcher not in ("alltoall", "auto", "local"):
        raise ExpertParallelError(f"dispatcher {dispatcher!r} is unknown; use alltoall (or auto, which picks alltoall)")

    def factory(E: int) -> Dispatcher:
        if meshes.ep == 1:
            return LocalDispatcher(E)
        return AllToAllDispatcher(E, meshes.ep_group)

    experts = shard_experts(model, meshes.ep, meshes.ep_rank, factory, 1.0 / meshes.ep)
    layers = decoder_layers(model)
    if activation_checkpointing and hasattr(model, "gradient_checkpointing"):  # zoo models: same parameter names
        model.gradient_checkpointing = True
    elif activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(list(layers)):
            layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Experts are FSDP-sharded over ep_dp (the ranks holding the same experts) only where that group has more than
    # one rank; with ep == world each expert lives on one rank, its gradient is complete after the all-to-all
    # backward and needs no reduction. A rank may also hold no experts (uneven Shard(0)); so do all ranks of its
    # ep_dp group, so skipping those is consistent across the ranks that would reduce them. Experts left unwrapped
    # are ignored by the dp wrappers (their values differ across ep ranks). One rank in all: no FSDP at all.
    skip: set[nn.Parameter] = set()
    for mod in experts:
        if mod.gate_up_proj.shape[0] == 0 or meshes.world // meshes.ep == 1:
            skip.update(mod.parameters(recurse=False))
        else:
            fully_shard(mod, mesh=meshes.ep_dp_mesh, mp_policy=mp)
    if meshes.world > 1:
        for layer in layers:
            fully_shard(layer, mesh=meshes.dp, mp_policy=mp, ignored_params=skip or None)
        fully_shard(model, mesh=meshes.dp, mp_policy=mp, ignored_params=skip or None)
    return model

