"""Checkpoint I/O for the zoo, through the conversion engine in convert/.

Contract:
- `load_state_dict(src, revision, model_type) -> {name: tensor}`: every tensor of a local folder or hub id, per-expert
  or fused on disk, in transformers v5's in-memory naming and fused layout (what the zoo models and transformers'
  models hold). Uses `automodel_convert.convert.load_fused_state_dict` for the model types convert/ maps.
- `save_state_dict(state_dict, dst, config, layout="original" | "fused", max_shard_size, generation_config)`: writes a
  checkpoint folder (config.json + safetensors shards + index, + generation_config.json when one is given):
  "original" = the per-expert hub layout of the model type, "fused" = the fused layout. config.json's `dtype` is the
  dtype of the first floating tensor of `state_dict` (transformers' rule: the first floating parameter), whatever
  `config.dtype` says; `config` itself is not modified. For the model types convert/ maps this is
  `convert.state.save_state_dict`: the planner and the streaming engine, the tensors written once from memory,
  atomically (the same planner path `parallel/save.py` uses). Other types: "fused" is written as is (transformers'
  naming), "original" through transformers' save.

TODO(convert): model types convert/ does not map are loaded with transformers (`from_pretrained` then
`state_dict()`) and saved through it.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ...convert import state as convert_state
from ...convert.api import load_fused_state_dict
from ...convert.registry import registry
from ...convert.safetensors_io import torch_dtype


def convert_supports(model_type: str) -> bool:
    return model_type in registry()


def load_state_dict(src: str | Path, *, revision: str | None = None, model_type: str | None = None) -> dict[str, torch.Tensor]:
    if model_type is None:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(src), revision=revision).model_type
    if convert_supports(model_type):
        return load_fused_state_dict(src, revision=revision, model_type=model_type)
    # model types convert/ does not map load through transformers
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), revision=revision, dtype="auto")
    return {k: v.detach() for k, v in hf.state_dict().items()}


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # the dtypes loading may widen (see disk_dtypes)


def disk_dtypes(src: str | Path, revision: str | None = None) -> dict[str, torch.dtype]:
    """On-disk dtype of every floating tensor of a checkpoint (safetensors headers only), by on-disk name."""
    from safetensors import safe_open

    try:
        from ...convert.source import resolve_source  # noqa: PLC0415

        folder = resolve_source(str(src), revision)
    except Exception:  # noqa: BLE001 - best effort: unknown source layout
        folder = Path(src)
    out: dict[str, torch.dtype] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                st = h.get_slice(name).get_dtype()
                if st in _FLOAT_DTYPES:
                    out[name] = torch_dtype(st)
    return out


def _unshare(state_dict: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Drop a tied lm_head (transformers does not write it) and make every tensor contiguous and unshared."""
    out: dict[str, torch.Tensor] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for k, v in state_dict.items():
        if tied and k == "lm_head.weight":
            continue
        out[k] = v.detach().to("cpu").contiguous()
    return out


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    dst: str | Path,
    *,
    config: Any,
    layout: str = "original",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    generation_config: Any = None,
) -> Path:
    if layout not in ("original", "fused"):
        raise ValueError(f"layout must be 'original' or 'fused', not {layout!r}")
    dst = Path(dst)
    tensors = _unshare(state_dict, config)
    config = with_true_dtype(config, tensors)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if convert_supports(config.model_type):
        files = _config_files(config, generation_config)
        convert_state.save_state_dict(
            tensors,
            dst,
            model_type=config.model_type,
            config=json.loads(files["config.json"]),
            layout=layout,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            extra_files=files,
        )
        return dst
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True)")
    if layout == "fused":
        _write_fused(tensors, dst, config, max_shard_size)
        _write_configs(dst, config, generation_config)
    else:
        _save_with_transformers(tensors, dst, config, generation_config)
    return dst


def with_true_dtype(config: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A copy of `config` whose `dtype` is that of the first floating tensor (unchanged when there is none)."""
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    if dtype is None:
        return config
    config = copy.deepcopy(config)
    config.dtype = dtype
    return config


def _config_files(config: Any, generation_config: Any) -> dict[str, bytes]:
    """config.json (and generation_config.json) exactly as transformers' `save_pretrained` writes them, as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        _write_configs(tmp, config, generation_config)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _write_configs(folder: str | Path, config: Any, generation_config: Any) -> None:
    config.save_pretrained(str(folder))
    if generation_config is not None:
        generation_config.save_pretrained(str(folder))


def _write_fused(tensors: dict[str, torch.Tensor], dst: Path, config: Any, max_shard_size: str | int) -> None:
    """The in-memory (fused) names and layout, sharded like transformers (what it writes for a fused model)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(dst / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_with_transformers(tensors: dict[str, torch.Tensor], dst: Path, config: Any, generation_config: Any) -> None:
    """TODO(convert): types convert/ does not map are written by transformers (a model made by `from_config` saves
    the per-expert original layout; its own save writes the dtype and, without `generation_config`, the generation
    config it derives from `config`)."""
    import transformers

    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.load_state_dict(tensors, strict=False, assign=True)
    if generation_config is not None:
        hf.generation_config = generation_config
    hf.save_pretrained(str(dst))
