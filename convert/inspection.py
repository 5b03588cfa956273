"""`inspect`: model type, detected layout, plan and, with `ep`, the experts and bytes each rank reads; plus the
dry run from config.json and the index alone (`inspect_dry_run`, `plan_from_index`). Nothing is written; bad input
raises `ConvertError` (one line).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import INDEX_NAME, Checkpoint, _load_json, load_config, open_checkpoint
from .errors import ConvertError
from .mapping import Layout, MoEMapping, Template
from .plan import Plan, key_coverage, plan_conversion
from .registry import get_mapping
from .safetensors_io import DTYPE_SIZES, FileHeader, TensorInfo
from .sharding import ep_ranges
from .source import resolve_source

if TYPE_CHECKING:
    pass


from .resolve import layout_arg, open_source

# ---------------------------------------------------------------- inspect


def inspect(
    src: str | Path,
    *,
    model_type: str | None = None,
    revision: str | None = None,
    ep: int | None = None,
    dry_run: bool = False,
    source_layout: str | Layout | None = None,
) -> dict:
    """Model type, layout, plan summary (and bytes per EP rank). `dry_run`: from config.json and the index alone."""
    if dry_run:
        return inspect_dry_run(src, model_type=model_type, revision=revision)
    given = layout_arg(source_layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--source-layout")
    ckpt, mapping, mt = open_source(src, revision, model_type)
    plan = plan_conversion(ckpt, mapping, Layout.FUSED, naming="model", model_type=mt, source_layout=given)
    expert_outs = _expert_outputs(plan, mapping)
    expert_bytes = sum(t.nbytes for t in expert_outs)
    info = {
        "source": str(ckpt.root),
        "model_type": mt,
        "family": mapping.family,
        "layout": str(plan.source_layout),
        "hub_layout": str(mapping.disk_layout) if mapping.groups else "fused (disk equals model)",
        "files": len(ckpt.files),
        "tensors": len(ckpt.tensors),
        "total_bytes": ckpt.total_bytes,
        "expert_bytes": expert_bytes,
        "non_expert_bytes": ckpt.total_bytes - expert_bytes,
        "groups": _group_summary(plan),
        "passthrough": len(plan.passthrough),
        "plan": {"target": "fused", "outputs": len(plan.outputs), "notes": plan.notes},
        "quantization": (ckpt.config.get("quantization_config") or {}).get("quant_method"),
    }
    if ep:
        if ep < 1:
            raise ConvertError("--ep must be a positive integer")
        ranks = [_rank_share(r, ep, expert_outs, mapping.num_experts(ckpt.config)) for r in range(ep)]
        for rank in ranks:
            rank["non_expert_bytes"] = info["non_expert_bytes"]
            rank["bytes_read"] = rank["expert_bytes"] + info["non_expert_bytes"]
        info["ep"] = {"size": ep, "ranks": ranks}
    return info


def _group_summary(plan: Plan) -> list[dict]:
    """One entry per fused tensor name: its parts, instance count, E, part shapes and dtype."""
    groups: dict[str, dict] = {}
    for gi in plan.instances:
        g = groups.setdefault(gi.group.fused, {"fused": gi.group.fused, "parts": list(gi.group.parts), "instances": 0,
                                               "experts": gi.num_experts, "part_shapes": [list(s) for s in gi.part_shapes],
                                               "dtype": gi.dtype})
        g["instances"] += 1
    return list(groups.values())


def _expert_outputs(plan: Plan, mapping: MoEMapping) -> list:
    """The expert tensors of the fused state: the fused groups, plus the mapping's `expert_tensors` (types stored as
    the model holds them: gpt_oss, llama4, dbrx, jetmoe; MXFP4 blocks/scales), all sharded along dim 0 by EP."""
    templates = [Template(x) for x in mapping.expert_tensors]
    return [t for t in plan.outputs if t.group is not None or (t.shape and any(x.match(t.name) for x in templates))]


def _rank_share(r: int, ep: int, expert_outs: list, n_cfg: int | None) -> dict:
    """Rank r's experts and expert bytes under EP `Shard(0)` (the torch.chunk rule of `convert.sharding`)."""
    nbytes, experts = 0, set()
    for t in expert_outs:
        E = t.shape[0]
        owned = ep_ranges(E, ep)[r]
        if t.group is not None:
            experts.update(owned)
            nbytes += sum(p.n for p in t.pieces if p.expert in owned)
        else:  # a native expert tensor: one Shard(0) byte range (dbrx: E * I expert-major rows)
            nbytes += len(owned) * (t.nbytes // E if E else 0)
            n = n_cfg or E
            rows = E // n if n and E % n == 0 else 1  # rows per expert
            if owned:
                experts.update(range(owned.start // rows, -(-owned.stop // rows)))
    return {"rank": r, "experts": [min(experts), max(experts)] if experts else [], "num_experts": len(experts),
            "expert_bytes": nbytes}


# ---------------------------------------------------------------- dry run: config.json and the index alone


def _index_source(src: str | Path, revision: str | None) -> Path:
    """A local folder as is; a hub repo id fetches only config.json and the safetensors index."""
    text = str(src)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return resolve_source(text, revision)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(text, revision=revision, allow_patterns=["config.json", "*.safetensors.index.json"])
        )
    except Exception as e:  # noqa: BLE001 - hub errors vary; the message says what to do
        raise ConvertError(
            f"cannot fetch config.json and {INDEX_NAME} of {text!r} from the hub ({type(e).__name__}); check the name, log in, or download them"
        ) from e


def index_keys(folder: Path, *, require_config: bool = True) -> tuple[list[str], dict]:
    """Tensor names from `model.safetensors.index.json` (no weight file is opened), else from the shard headers."""
    config = load_config(folder, required=require_config, beside="the index")
    if (folder / INDEX_NAME).exists():
        wm = _load_json(folder / INDEX_NAME, "the safetensors index").get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConvertError(f"{folder / INDEX_NAME}: no weight_map; fix the index")
        return [str(k) for k in wm], config
    if any(folder.glob("*.safetensors")):
        return list(open_checkpoint(folder, require_config=False).tensors), config
    raise ConvertError(f"{folder} has neither {INDEX_NAME} nor safetensors shards; a dry run needs the index")


def inspect_dry_run(src: str | Path, *, model_type: str | None = None, revision: str | None = None) -> dict:
    """Key coverage from config.json and the index alone: every key the mapping would not know how to map."""
    folder = _index_source(src, revision)
    keys, config = index_keys(folder, require_config=model_type is None)
    mt = model_type or config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ConvertError(f"{folder / 'config.json'} has no model_type; pass --model-type")
    mapping = get_mapping(mt)
    cov = key_coverage(keys, mapping, config, model_type=mt)
    return {
        "source": str(folder),
        "model_type": mt,
        "family": mapping.family,
        "dry_run": True,
        "layout": str(cov.layout) if cov.layout else "fused (disk equals model)" if not mapping.groups else None,
        "hub_layout": str(mapping.disk_layout) if mapping.groups else "fused (disk equals model)",
        "quantization": (config.get("quantization_config") or {}).get("quant_method"),
        "tensors": cov.keys,
        "groups": list(cov.groups.values()),
        "expert_tensors": cov.expert_tensors,
        "passthrough": cov.passthrough,
        "renamed": cov.renamed,
        "unmapped": cov.unmapped,
        "problems": cov.problems,
        "complete": cov.complete,
    }


def checkpoint_from_shapes(root: Path, config: dict, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> Checkpoint:
    """A header-only stand-in (no file) for planning: key -> (safetensors dtype, shape), laid out in order."""
    infos, pos = [], 0
    for key, (dtype, shape) in shapes.items():
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        infos.append(TensorInfo(key, dtype, tuple(shape), "<index>", pos, n))
        pos += n
    header = FileHeader("<index>", tuple(infos), {"format": "pt"}, 0, pos)
    return Checkpoint(Path(root), {"<index>": header}, {t.name: t for t in infos}, config, {}, None)


def plan_from_index(
    src: str | Path,
    shapes: dict[str, tuple[str, tuple[int, ...]]],
    *,
    model_type: str | None = None,
    revision: str | None = None,
    layout: str | Layout = "fused",
    naming: str = "model",
) -> Plan:
    """The conversion plan of a checkpoint known only by config.json, its index and the given dtypes and shapes."""
    folder = _index_source(src, revision)
    keys, config = index_keys(folder, require_config=model_type is None)
    mt = model_type or config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ConvertError(f"{folder / 'config.json'} has no model_type; pass --model-type")
    missing = [k for k in keys if k not in shapes]
    extra = sorted(set(shapes) - set(keys))
    if missing or extra:
        raise ConvertError(
            f"shapes do not match the index: {len(missing)} keys without a shape (e.g. {missing[:1]}), {len(extra)} unknown (e.g. {extra[:1]})"
        )
    target = layout_arg(layout, (Layout.PER_EXPERT, Layout.FUSED, Layout.TRANSPOSED), "--layout")
    ckpt = checkpoint_from_shapes(folder, config, {k: shapes[k] for k in keys})
    return plan_conversion(ckpt, get_mapping(mt), target, naming=naming, model_type=mt)


