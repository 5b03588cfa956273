"""A source resolved once: folder, checkpoint headers, mapping and model type, plus what every command records.

Contract: `open_source(src, revision, model_type)` resolves a hub id or folder (`source.resolve_source`), reads its
headers (`checkpoint.open_checkpoint`, no tensor data) and looks up the model type's mapping
(`registry.get_mapping`); the model type is `model_type`, else the one `merge --model-type` recorded in the
sidecar, else config.json's. `layout_arg` parses a CLI/API layout name, `file_metadata` is the per-file metadata a
written layout carries, `read_sidecar` the record `merge`/`split` write (`automodel_convert.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from .checkpoint import Checkpoint, open_checkpoint
from .engine import (
    record_original,
)
from .errors import ConvertError
from .mapping import Layout, MoEMapping
from .plan import LAYOUT_METADATA_KEY, Plan
from .registry import get_mapping
from .source import resolve_source

if TYPE_CHECKING:
    pass


def open_source(src: str | Path, revision: str | None, model_type: str | None) -> tuple[Checkpoint, MoEMapping, str]:
    folder = resolve_source(str(src), revision)
    ckpt = open_checkpoint(folder, require_config=model_type is None)
    mt = model_type or (ckpt.sidecar or {}).get("model_type") or ckpt.config.get("model_type")  # merge's --model-type
    if not isinstance(mt, str) or not mt:
        raise ConvertError(f"{folder / 'config.json'} has no model_type; pass --model-type")
    return ckpt, get_mapping(mt), mt


def layout_arg(layout: str | Layout | None, allowed: tuple[Layout, ...], option: str) -> Layout | None:
    if layout is None or isinstance(layout, Layout):
        return layout
    names = {
        "hf": Layout.FUSED,
        "fused": Layout.FUSED,
        "transposed": Layout.TRANSPOSED,
        "per_expert": Layout.PER_EXPERT,
        "per-expert": Layout.PER_EXPERT,
    }
    if layout not in names or names[layout] not in allowed:
        raise ConvertError(f"{option} {layout!r} is not one of {', '.join(str(a) for a in allowed)}")
    return names[layout]


def file_metadata(layout: Layout) -> dict[str, str]:
    meta = {"format": "pt"}
    if layout is Layout.TRANSPOSED:
        meta[LAYOUT_METADATA_KEY] = str(layout)
    return meta


def read_sidecar(ckpt: Checkpoint, plan: Plan, mt: str) -> dict:
    original = (ckpt.sidecar or {}).get("original") or record_original(ckpt)
    source_layout = (ckpt.sidecar or {}).get("original_layout") or str(plan.source_layout)
    return {
        "tool": "automodel-convert",
        "version": __version__,
        "model_type": mt,
        "layout": str(plan.target_layout),
        "original_layout": source_layout,
        "parts": {
            gi.group.fused_template.format(**gi.captures): [list(s) for s in gi.part_shapes] for gi in plan.instances
        },
        "original": original,
    }


