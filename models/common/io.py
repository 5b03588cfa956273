"""Checkpoint I/O for the zoo, through the conversion engine in convert/.

Contract:
- `load_state_dict(src, revision, model_type) -> {name: tensor}`: every tensor of a local folder or hub id, per-expert
  or fused on disk, in transformers v5's in-memory naming and fused layout (what the zoo models and transformers'
  models hold). Uses `automodel_convert.convert.load_fused_state_dict` for the model types convert/ maps.
- `save_state_dict(state_dict, dst, config, layout="original" | "fused", max_shard_size, generation_config)`: writes a
  checkpoint folder (config.json + safetensors shards, + generation_config.json when one is given): "original" = the
  per-expert hub layout of the model type, "fused" = the fused layout. config.json's `dtype` is the dtype of the first
  floating tensor of `state_dict` (transformers' rule: the first floating parameter), whatever `config.dtype` says;
  `config` itself is not modified. Uses `automodel_convert.convert.save_state_dict` when it exists, else `convert.split` for the types convert/
  maps; other types: "fused" is written as is (transformers' naming), "original" through transformers' save.

TODO(convert): two temporary bridges, to delete once convert/ has the pieces:
  * model types convert/ does not map are loaded with transformers (`from_pretrained` then `state_dict()`);
  * until `convert.save_state_dict` exists, the fused state dict is written to a temporary folder and `convert.split`
    turns it into the requested layout (one extra write of the checkpoint).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

FUSED_FILE = "model.safetensors"


def _convert():  # noqa: ANN202
    from ... import convert as _c  # noqa: PLC0415 - automodel_convert.convert

    return _c


def convert_supports(model_type: str) -> bool:
    try:
        from ...convert.registry import registry  # noqa: PLC0415
    except ImportError:
        return False
    return model_type in registry()


def load_state_dict(src: str | Path, *, revision: str | None = None, model_type: str | None = None) -> dict[str, torch.Tensor]:
    if model_type is None:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(src), revision=revision).model_type
    conv = _convert()
    if hasattr(conv, "load_fused_state_dict") and convert_supports(model_type):
        return conv.load_fused_state_dict(src, revision=revision, model_type=model_type)
    # TODO(convert): model types convert/ does not map yet load through transformers.
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), revision=revision, dtype="auto")
    return {k: v.detach() for k, v in hf.state_dict().items()}


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
                dt = _ST_DTYPES.get(h.get_slice(name).get_dtype())
                if dt is not None:
                    out[name] = dt
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
    from safetensors.torch import save_file

    dst = Path(dst)
    conv = _convert()
    tensors = _unshare(state_dict, config)
    config = with_true_dtype(config, tensors)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        _write_configs(tmp, config, generation_config)  # convert/ copies both into the destination
        if hasattr(conv, "save_state_dict"):
            conv.save_state_dict(tensors, dst, src_config_dir=tmp, layout=layout)
            return dst
        # TODO(convert): replace with convert.save_state_dict once it exists.
        save_file(tensors, str(Path(tmp) / FUSED_FILE), metadata={"format": "pt"})
        (Path(tmp) / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict.fromkeys(tensors, FUSED_FILE)})
        )
        if convert_supports(config.model_type):
            target = None if layout == "original" else "fused"
            conv.split(tmp, dst, layout=target, max_shard_size=max_shard_size, overwrite=overwrite)
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
