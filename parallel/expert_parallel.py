"""Expert parallelism + FSDP2 on one mesh for MoE models whose experts use transformers v5's fused layout.

Contract:
- Meshes (`parallel.ParallelMesh`, from `parallel.build_mesh(ep=...)`): `dp` spans all W ranks (every rank trains on its own data); `ep` (size `ep`) and `ep_dp`
  (size W/ep) factor the same ranks: rank = ep_dp_index * ep + ep_index. Ranks of one `ep` group hold different
  experts; ranks of one `ep_dp` group hold the same experts.
- `parallelize(model, meshes)` finds every experts module (3-D `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`
  parameters; transformers' own experts classes are swapped for the zoo's `GroupedExperts` holding the same
  parameters), keeps this rank's `Shard(0)` slice of its experts (torch.chunk rule; uneven E works) and swaps its
  dispatcher (`parallel.ep_dispatch`: all-to-all or DeepEP). The module's forward is untouched: expert parallelism
  is "shard the weights and swap the dispatcher". Experts are then FSDP2-sharded
  over `ep_dp` when it has more than one rank (gradients reduced only among ranks holding the same experts; with
  ep == world nothing to reduce), dense parameters over `dp` (world > 1), with bf16 compute and fp32 gradient reduction. A single rank gets no FSDP wrapper.
- Output head: a zoo model's untied head (`models.common.loss.LMHead`, whose `loss` method reads its own weight)
  is an FSDP2 unit of its own with `loss` registered as a forward method, so its gradient (complete once the loss's
  backward has run, the first thing backward does) is reduce-scattered while the decoder layers' backward computes,
  instead of with the embeddings at the very end. Its gathered weight is kept until backward (no second gather).
  Each decoder layer prefetches the next unit's parameters in forward (`prefetch_forward`).
- Gradient reduce dtype (`reduce_dtype="auto"`): bf16 for a group of exactly 2 ranks when the parameters are stored
  in bf16, else fp32. With 2 ranks FSDP2 averages with NCCL's AVG (each input times 0.5, exact in both dtypes, then
  one addition): bf16 + bf16 correctly rounded to bf16 is the same number as the exact fp32 sum rounded to the bf16
  gradient, so the bf16 reduce gives bit-identical gradients (tests/test_ep_multi_gpu.py checks it) with half the
  bytes and half the staging memory. With more ranks the partial sums are rounded on the way: fp32 there.
- Parameters kept in another dtype than the rest (fp32 routers of bf16 DeepSeek-style models): each such module
  is an FSDP2 unit of its own computing in its own dtype (`kept_dtype_modules`), as FSDP2 needs one dtype per unit.
- Gradient scale: every rank's loss reaches the experts it routed to, so expert gradients sum W per-rank losses;
  FSDP averages over `ep_dp` (W/ep ranks), and `GroupedExperts.grad_scale = 1/ep` makes the result the
  gradient of the mean loss, like the dense parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..convert.registry import declared_spec
from ..models.common.dispatch import TokenDispatcher
from ..models.common.experts import GroupedExperts
from ..models.common.hf_experts import default_gate
from .ep_dispatch import DispatcherError, check_token_bound, choose_dispatcher, expert_bounds, make_dispatcher
from .mesh import ParallelMesh

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy


class ExpertParallelError(ValueError):
    """A model or configuration expert parallelism cannot handle (one line, says what to change)."""


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, mod in model.named_modules():
        gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3:
            why = _ep_refusal(model, mod)
            if why:
                raise ExpertParallelError(f"{name}: {why}: no expert-parallel support yet; use --ep 1")
            found.append((name, mod))
    return found


def _ep_refusal(model: nn.Module, mod: nn.Module) -> str | None:
    """Why expert parallelism refuses `mod`: its type's record (`ModelSpec.ep_unsupported`), else, for a type no
    record refuses (transformers' own classes, e.g. aria), experts with biases or a transposed layout."""
    spec = declared_spec(getattr(getattr(model, "config", None), "model_type", None) or "")
    if spec is not None and spec.ep_unsupported:
        return spec.ep_unsupported
    if getattr(mod, "has_bias", False) or getattr(mod, "is_transposed", False) or hasattr(mod, "gate_up_proj_bias"):
        return "experts with biases or a transposed layout"
    return None


def as_grouped_experts(name: str, mod: nn.Module) -> GroupedExperts:
    """The zoo's `GroupedExperts` holding `mod`'s own parameters (same names, so state dicts are unchanged).

    transformers' experts classes (concatenated SwiGLU, `gate_up_proj [E, 2I, H]`) become the zoo module, so there
    is one grouped compute path and one place to swap the dispatcher; other experts variants are refused.
    """
    if isinstance(mod, GroupedExperts):
        return mod
    plain = getattr(mod, "has_gate", True) and getattr(mod, "is_concatenated", True) and not getattr(mod, "has_post_expert_norm", False)
    if not (plain and default_gate(mod)):
        raise ExpertParallelError(f"{name}: {type(mod).__name__} is not a plain concatenated SwiGLU experts module; expert parallelism does not support it yet, use --ep 1")
    E = int(getattr(mod, "num_experts", mod.gate_up_proj.shape[0]))
    _, two_i, h = mod.gate_up_proj.shape
    with torch.device("meta"):
        new = GroupedExperts(E, h, two_i // 2, impl="auto", swiglu_impl="auto")
    new.gate_up_proj, new.down_proj = mod.gate_up_proj, mod.down_proj
    new.act_fn = F.silu if isinstance(mod.act_fn, nn.SiLU) or type(mod.act_fn).__name__ == "SiLUActivation" else mod.act_fn
    if hasattr(mod, "_ep_num_experts"):
        new._ep_num_experts = mod._ep_num_experts
    return new


def _count_load(mod: nn.Module, args: tuple) -> None:
    """Routed (token, slot) pairs per global expert, accumulated in place into a persistent buffer: no host sync
    (bincount on CUDA syncs) and correct under CUDA graph replay."""
    with torch.no_grad():
        flat = args[1].reshape(-1)
        buf = getattr(mod, "_ep_load", None)
        if buf is None or buf.device != flat.device:
            buf = mod._ep_load = torch.zeros(mod._ep_num_experts, dtype=torch.int64, device=flat.device)
        buf.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))


def expert_load(model: nn.Module, reset: bool = True) -> torch.Tensor | None:
    """Routed (token, slot) pairs per expert since the last call, `[layers, E]` summed over this rank's tokens."""
    loads = []
    for _, mod in experts_modules(model):
        if getattr(mod, "_ep_load", None) is not None:
            loads.append(mod._ep_load.clone())
            if reset:
                mod._ep_load.zero_()
    return torch.stack(loads) if loads else None


def shard_experts(model: nn.Module, ep: int, ep_rank: int, make: Callable[[int], TokenDispatcher] | None) -> list[GroupedExperts]:
    """Keep this rank's `Shard(0)` slice of every experts module and give it `make(E)`'s dispatcher (ep > 1).

    transformers' experts modules are first swapped for the zoo's (`as_grouped_experts`). Weights already sliced
    (sharded loading records the global E as `_ep_num_experts`) are kept as they are. Returns the modules.
    """
    mods = experts_modules(model)
    if not mods:
        raise ExpertParallelError(f"{type(model).__name__} has no fused experts modules (gate_up_proj/down_proj); this model type has no expert-parallel support")
    out = []
    for name, old in mods:
        mod = as_grouped_experts(name, old)
        if mod is not old:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, mod)
        E = getattr(mod, "_ep_num_experts", mod.gate_up_proj.shape[0])
        b = expert_bounds(E, ep)
        if mod.gate_up_proj.shape[0] != b[ep_rank + 1] - b[ep_rank]:
            mod.gate_up_proj = nn.Parameter(mod.gate_up_proj.data[b[ep_rank] : b[ep_rank + 1]].clone())
            mod.down_proj = nn.Parameter(mod.down_proj.data[b[ep_rank] : b[ep_rank + 1]].clone())
        mod._ep_num_experts = mod.num_experts = E
        if ep > 1:
            mod.dispatcher = make(E)
            mod.grad_scale = 1.0 / ep
        if not getattr(mod, "_ep_load_hook", False):
            mod.register_forward_pre_hook(_count_load)
            mod._ep_load_hook = True
        out.append(mod)
    return out


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
    meshes: ParallelMesh,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | str = "auto",
    activation_checkpointing: bool = False,
    dispatcher: str = "auto",
    reshard_after_forward: bool = True,
    max_tokens: int | None = None,
) -> nn.Module:
    """Expert-shard, (optionally) checkpoint and FSDP2-wrap `model` in place; returns it.

    `dispatcher` is resolved by `ep_dispatch.choose_dispatcher` (auto: DeepEP on CUDA with ep > 1 where deep_ep
    imports, else all-to-all); the name used is left in `model.ep_dispatcher`. `reshard_after_forward=False` keeps
    the dense layers' gathered parameters from forward to backward (no second all-gather, more memory).
    `reduce_dtype`: a dtype, or "auto" (see the module docstring); the dtypes used are left in
    `model.grad_reduce_dtypes` ({"dense": ..., "experts": ...}). `max_tokens`: the most tokens a rank passes to an
    experts module in one call (batch x seq); `dispatcher="deepep_static"` sizes its buffers by it.
    """
    experts = _shard_and_dispatch(model, meshes, dispatcher, max_tokens)
    layers = decoder_layers(model)
    if activation_checkpointing:
        _checkpoint_layers(model, layers)
    stored = next(model.parameters()).dtype
    mp, mp_experts = _precision_policies(model, meshes, param_dtype, reduce_dtype, stored)
    skip = _fsdp_experts(experts, meshes, mp_experts, reshard_after_forward)
    if meshes.world > 1:
        _fsdp_dense(model, layers, meshes, mp, skip, stored, reduce_dtype, reshard_after_forward)
    return model


def _shard_and_dispatch(model: nn.Module, meshes: ParallelMesh, dispatcher: str, max_tokens: int | None = None) -> list[GroupedExperts]:
    """Resolve the dispatcher, keep this rank's experts with it (`shard_experts`); the name goes to `model.ep_dispatcher`."""
    try:
        name = choose_dispatcher(dispatcher, meshes.ep, meshes.device_type)
        check_token_bound(name, max_tokens)  # before any module is sharded
    except DispatcherError as e:
        raise ExpertParallelError(str(e)) from e
    group = meshes.ep_group if meshes.ep > 1 else None
    experts = shard_experts(model, meshes.ep, meshes.ep_rank, lambda E: make_dispatcher(name, E, group, max_tokens))
    model.ep_dispatcher = name if meshes.ep > 1 else "local"
    return experts


def _checkpoint_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    """Activation checkpointing: the zoo model's own switch, else each decoder layer wrapped in place."""
    if hasattr(model, "gradient_checkpointing"):  # zoo models: same parameter names
        model.gradient_checkpointing = True
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, layer in enumerate(list(layers)):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def _precision_policies(
    model: nn.Module, meshes: ParallelMesh, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | str,
    stored: torch.dtype,
) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """(dense, experts) FSDP2 mixed-precision policies; the reduce dtypes chosen go to `model.grad_reduce_dtypes`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dense_rd = grad_reduce_dtype(reduce_dtype, meshes.world, stored)
    expert_rd = grad_reduce_dtype(reduce_dtype, meshes.world // meshes.ep, stored)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=dense_rd)
    mp_experts = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=expert_rd)
    model.grad_reduce_dtypes = {"dense": dense_rd, "experts": expert_rd}
    return mp, mp_experts


def _fsdp_experts(
    experts: list[GroupedExperts], meshes: ParallelMesh, mp_experts: MixedPrecisionPolicy, reshard_after_forward: bool
) -> set[nn.Parameter]:
    """FSDP2-shard the experts over `ep_dp` where that helps; returns the expert parameters left unwrapped."""
    from torch.distributed.fsdp import fully_shard

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
            fully_shard(mod, mesh=meshes.ep_dp_mesh, mp_policy=mp_experts, reshard_after_forward=reshard_after_forward)
    return skip


def _fsdp_dense(
    model: nn.Module, layers: nn.ModuleList, meshes: ParallelMesh, mp: MixedPrecisionPolicy, skip: set[nn.Parameter],
    stored: torch.dtype, reduce_dtype: torch.dtype | str, reshard_after_forward: bool,
) -> None:
    """FSDP2 units over `dp`: kept-dtype submodules, each decoder layer, the separate head, the root; then prefetch."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    for layer in layers:
        for sub in kept_dtype_modules(layer, stored, skip):  # fp32 routers of bf16 models: units of their own
            own = grad_reduce_dtype(reduce_dtype, meshes.world, next(sub.parameters(recurse=False)).dtype)
            fully_shard(sub, mesh=meshes.dp_mesh, mp_policy=MixedPrecisionPolicy(param_dtype=None, reduce_dtype=own),
                        reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=meshes.dp_mesh, mp_policy=mp, ignored_params=skip or None, reshard_after_forward=reshard_after_forward)
    head = separate_head(model)
    if head is not None:
        fully_shard(head, mesh=meshes.dp_mesh, mp_policy=mp, reshard_after_forward=False)
        register_fsdp_forward_method(head, "loss")
    fully_shard(model, mesh=meshes.dp_mesh, mp_policy=mp, ignored_params=skip or None)
    prefetch_forward(list(layers) + ([head] if head is not None else []))


def prefetch_forward(units: list[nn.Module]) -> None:
    """Each FSDP unit starts gathering the next one's parameters when its own forward starts. FSDP2's implicit
    prefetch issues a gather only when the CPU reaches the next module, and the EP dispatchers' host syncs keep the
    CPU close behind the GPU; the explicit one gives each gather a whole layer of compute to hide behind."""
    for unit, nxt in zip(units, units[1:]):
        unit.set_modules_to_forward_prefetch([nxt])


def kept_dtype_modules(layer: nn.Module, stored: torch.dtype, skip: set[nn.Parameter]) -> list[nn.Module]:
    """Submodules of `layer` whose own parameters are stored in another dtype than the model's: the fp32 routers of
    bf16 DeepSeek-style models (transformers' `_keep_in_fp32_modules_strict`). FSDP2 needs one dtype per unit, and
    casting them for compute would change the routing, so each becomes a unit of its own that computes in its own
    dtype (no `param_dtype`)."""
    found = []
    for sub in layer.modules():
        own = [p for p in sub.parameters(recurse=False) if p not in skip]
        if sub is not layer and own and all(p.dtype != stored for p in own):
            found.append(sub)
    return found


def grad_reduce_dtype(requested: torch.dtype | str, group_size: int, stored: torch.dtype) -> torch.dtype:
    """The gradient reduce dtype for a group of `group_size` ranks: "auto" is bf16 where that is bit-identical to
    fp32 (2 ranks, bf16 parameters; see the module docstring), else fp32; a dtype is used as given."""
    if requested != "auto":
        return requested
    return torch.bfloat16 if group_size == 2 and stored == torch.bfloat16 else torch.float32


def separate_head(model: nn.Module) -> nn.Module | None:
    """The output head when it can be an FSDP unit of its own: it computes the loss in a method of its own
    (`LMHead.loss`) and is not tied to the input embeddings."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or not callable(getattr(head, "loss", None)):
        return None
    if embed is not None and getattr(embed, "weight", None) is head.weight:
        return None
    return head
