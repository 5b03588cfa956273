"""`AutoModelForCausalLM`: the zoo class for a checkpoint's model_type, or transformers' class with our experts.

Contract:
- `from_pretrained(src, dtype=None, backend=None, device=None, device_mesh=None, revision=None)`: reads config.json
  with transformers' AutoConfig; for a type whose record names a zoo class (models/registry.py) builds our model on the meta device and
  assigns every tensor of the checkpoint (per-expert or fused, via models/common/io.py), strict: a missing or
  unexpected key is an error (extra decoder layers beyond `num_hidden_layers`, e.g. DeepSeek's MTP layer, and
  stale `rotary_emb.inv_freq` entries are dropped). dtype None keeps the checkpoint's dtype; sigmoid routers stay
  fp32. Other MoE types: transformers' own class with `experts_implementation="automodel_grouped"` (our grouped
  GEMM path, models/common/hf_experts.py). The zoo model's `generation_config` is the checkpoint's
  generation_config.json, else derived from config.json (transformers' rule).
- `from_pretrained(..., device_mesh=mesh)` (a `parallel.ParallelMesh`, whose `load_sharded_state` hook runs
  `parallel.load_sharded`; models never imports parallel): each rank reads its own
  bytes only; every experts module keeps this rank's `Shard(0)` slice of its experts along the mesh's "ep" dim
  (torch.chunk rule) as plain local parameters and records `_ep_num_experts = E`, the form
  `parallel.expert_parallel.parallelize` takes; other tensors are loaded whole (replicated).
- `from_config(config, backend, dtype, device)`: random initialisation, same dispatch.
- `save_pretrained(model, dst, layout="original" | "fused")`: works for both kinds of model; config.json says the
  model's dtype and the model's generation_config.json is written.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backend import BackendConfig, as_backend
from .common import hf_experts
from .common.generation import load_generation_config
from .common.io import disk_dtypes, load_state_dict, save_state_dict
from .registry import get_model_class

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _clean_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    expected = set(model.state_dict().keys())
    dropped = []
    for k in list(sd):
        m = _LAYER.match(k)
        if (m and int(m.group(1)) >= num_layers) or k.endswith("rotary_emb.inv_freq"):
            dropped.append(k)
            del sd[k]
    if dropped:
        warnings.warn(f"ignored {len(dropped)} checkpoint tensors the model does not use (e.g. {dropped[0]})", stacklevel=3)
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in expected and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


class AutoModelForCausalLM:
    @staticmethod
    def from_config(
        config: Any,
        backend: BackendConfig | dict | str | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> nn.Module:
        backend = as_backend(backend)
        cls = get_model_class(config.model_type)
        if cls is not None:
            return cls.from_config(config, backend, dtype=dtype, device=device)
        import transformers

        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **hf_experts.hf_load_kwargs(backend))
        hf_experts.set_backend(model, backend.experts, backend.swiglu)
        return model.to(device) if device is not None else model

    @staticmethod
    def from_pretrained(
        src: str | Path,
        *,
        dtype: torch.dtype | None = None,
        backend: BackendConfig | dict | str | None = None,
        device: torch.device | str | None = None,
        device_mesh: Any = None,
        revision: str | None = None,
        model_class: type | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        from transformers import AutoConfig

        if device_mesh is not None:
            return _from_pretrained_sharded(src, device_mesh, dtype=dtype, backend=as_backend(backend), device=device,
                                            revision=revision, model_class=model_class, **kwargs)

        backend = as_backend(backend)
        config = AutoConfig.from_pretrained(str(src), revision=revision, **kwargs)
        if getattr(config, "quantization_config", None):
            raise NotImplementedError(
                "quantized checkpoints (FP8 / MXFP4) are not supported by the zoo yet: dequantize them first"
            )
        cls = model_class or get_model_class(config.model_type)
        if cls is None:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(src), revision=revision, dtype=dtype or "auto", **hf_experts.hf_load_kwargs(backend)
            )
            hf_experts.set_backend(model, backend.experts, backend.swiglu)
            return model.to(device) if device is not None else model
        with torch.device("meta"):
            model = cls(config, backend)
        sd = _clean_state_dict(model, load_state_dict(src, revision=revision, model_type=config.model_type), config.num_hidden_layers)
        model.load_state_dict(sd, strict=True, assign=True)
        model.generation_config = load_generation_config(str(src), config, revision)
        model.reset_buffers(model.lm_head.weight.device)  # non-persistent buffers are still on meta
        model.to(torch.device(device) if device is not None else model.lm_head.weight.device)
        model.cast(dtype)
        if dtype is None:  # remember what loading widened by itself (fp32 routers) for a bit-exact save
            on_disk = disk_dtypes(src, revision)
            model._source_dtypes = {
                k: on_disk.get(k, v.dtype) for k, v in model.state_dict().items() if on_disk.get(k, v.dtype) != v.dtype
            }
        return model

    @staticmethod
    def save_pretrained(model: nn.Module, dst: str | Path, *, layout: str = "original", **kwargs: Any) -> Path:
        if hasattr(model, "_source_dtypes"):
            model.save_pretrained(dst, layout=layout, **kwargs)
            return Path(dst)
        kwargs.setdefault("generation_config", getattr(model, "generation_config", None))
        return save_state_dict(model.state_dict(), dst, config=model.config, layout=layout, **kwargs)


def _from_pretrained_sharded(
    src: str | Path,
    mesh: Any,
    *,
    dtype: torch.dtype | None,
    backend: BackendConfig,
    device: torch.device | str | None,
    revision: str | None,
    model_class: type | None,
    **kwargs: Any,
) -> nn.Module:
    """`from_pretrained(device_mesh=...)`: expert shards straight from disk (see the module docstring)."""
    # the hook: the mesh loads its own shards (parallel.ParallelMesh.load_sharded_state); models never imports parallel
    load_state = getattr(mesh, "load_sharded_state", None)
    if load_state is None:
        raise TypeError("device_mesh must be a parallel.ParallelMesh (automodel_convert.parallel.build_mesh(ep=...))")
    from ..convert.source import resolve_source

    folder = resolve_source(str(src), revision)  # resolved once: config, shards and generation config read from it
    config, model = _meta_zoo_model(folder, backend, model_class, **kwargs)
    # dtype=None here: `cast` below applies the same rules as the unsharded path (fp32 routers stay fp32)
    state = load_state(folder)
    sd = _clean_state_dict(model, dict(state), config.num_hidden_layers)
    _check_sharded_keys(src, model, config, sd)
    dev = _sharded_device(device, mesh)
    _assign_local_tensors(model, sd, dev)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers(dev)
    model.cast(dtype)
    model.generation_config = load_generation_config(str(folder), config)
    model._sharded_source = state.source
    return model


def _meta_zoo_model(folder: Path, backend: BackendConfig, model_class: type | None, **kwargs: Any) -> tuple[Any, nn.Module]:
    """The folder's config and its zoo model built on the meta device; a type without a zoo model is refused."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), **kwargs)
    cls = model_class or get_model_class(config.model_type)
    if cls is None:
        raise NotImplementedError(
            f"model type {config.model_type!r} has no zoo model; sharded loading (device_mesh=) needs one of "
            "the zoo's families (automodel_convert.models.zoo_types())"
        )
    with torch.device("meta"):
        model = cls(config, backend)
    return config, model


def _check_sharded_keys(src: str | Path, model: nn.Module, config: Any, sd: dict[str, torch.Tensor]) -> None:
    """Strict: the loaded keys are exactly the model's (a tied head may be absent)."""
    wanted = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        wanted.pop("lm_head.weight", None)
    missing = [n for n in wanted if n not in sd]
    unexpected = [n for n in sd if n not in model.state_dict()]
    if missing or unexpected:
        raise ValueError(f"{src}: checkpoint does not match the {type(model).__name__} model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _sharded_device(device: torch.device | str | None, mesh: Any) -> torch.device:
    """`device` if given, else the current CUDA device of a CUDA mesh, else the CPU."""
    return torch.device(device) if device is not None else torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")


def _assign_local_tensors(model: nn.Module, sd: dict[str, torch.Tensor], dev: torch.device) -> None:
    """Each tensor's local part becomes the module's parameter or buffer on `dev`; experts modules holding a slice of
    their experts record the global E as `_ep_num_experts`."""
    experts_prefixes = set()
    for name, value in sd.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        prefix, _, leaf = name.rpartition(".")
        mod = model.get_submodule(prefix)
        if leaf in mod._parameters:
            if local.dim() == 3 and leaf in ("gate_up_proj", "down_proj") and tuple(local.shape) != tuple(mod._parameters[leaf].shape):
                experts_prefixes.add(prefix)
            mod._parameters[leaf] = nn.Parameter(local.to(dev), requires_grad=mod._parameters[leaf].requires_grad)
        else:
            mod._buffers[leaf] = local.to(dev)
    for prefix in experts_prefixes:
        model.get_submodule(prefix)._ep_num_experts = int(model.get_submodule(prefix).num_experts)  # global E
