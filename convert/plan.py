"""Conversion plans, built from safetensors headers alone.

Contract: `plan_conversion(ckpt, mapping, target)` describes every output tensor of converting checkpoint `ckpt`
into `target` layout as a list of pieces that exactly tile the tensor's bytes:
- `Copy(key, src, n, dst)`: output bytes `[dst, dst+n)` are source tensor `key`'s bytes `[src, src+n)`;
- `Transform(inputs, chain, select, dst, n)`: output bytes are `chain(inputs)[select]` for one expert, where the
  inputs are byte ranges of source tensors viewed with their shapes (ops only move elements: bit-exact).
Every source key is consumed exactly once; keys that no expert group matches pass through (renamed only).
Pieces carry their expert index, so expert parallelism can read just one rank's experts.

Layout detection: a checkpoint is `per_expert` when its keys match the groups' part templates, `fused`/`transposed`
when they match the fused templates (which of the two comes from the recorded sidecar/metadata or, for hub files,
the type's declared disk layout; never from shapes). Mixed or partial layouts are errors.
"""

from __future__ import annotations

from .checkpoint import Checkpoint
from .errors import MappingError
from .keys import GroupMatch, KeyCoverage, key_coverage, match_groups, match_key
from .mapping import Layout, MoEMapping
from .pieces import Copy, GroupInstance, OutTensor, Piece, Plan, Transform
from .plan_groups import emit_outputs, group_instances

LAYOUT_METADATA_KEY = "automodel_convert.layout"

__all__ = [
    "LAYOUT_METADATA_KEY",
    "Copy",
    "GroupInstance",
    "KeyCoverage",
    "OutTensor",
    "Piece",
    "Plan",
    "Transform",
    "key_coverage",
    "match_key",
    "plan_conversion",
]


def _layout_from_records(ckpt: Checkpoint) -> Layout | None:
    if ckpt.sidecar and ckpt.sidecar.get("layout"):
        return Layout(ckpt.sidecar["layout"])
    for h in ckpt.files.values():
        if h.metadata and LAYOUT_METADATA_KEY in h.metadata:
            return Layout(h.metadata[LAYOUT_METADATA_KEY])
    return None


def plan_conversion(
    ckpt: Checkpoint,
    mapping: MoEMapping,
    target: Layout,
    *,
    naming: str = "model",
    model_type: str | None = None,
    source_layout: Layout | None = None,
) -> Plan:
    """Plan converting `ckpt` (any supported layout) into `target` layout.

    `naming="model"` names outputs as transformers v5 holds them (merge); `naming="disk"` restores the hub's key
    names (split). A `per_expert` target always uses hub naming. `source_layout` is the user's word on how an
    already-fused checkpoint is oriented (`--source-layout`); it must fit the shapes. Four named steps: rename every
    key, match the keys to expert groups, decide the source layout, build and check the group instances; then emit
    the outputs in source order.
    """
    if naming not in ("model", "disk"):
        raise ValueError(f"naming must be 'model' or 'disk', not {naming!r}")
    disk_names = naming == "disk" or target is Layout.PER_EXPERT
    model_type = model_type or mapping.model_type
    if target is Layout.TRANSPOSED and not any(g.stacked for g in mapping.groups):
        raise MappingError(
            f"model type {model_type!r} stores its experts as the model holds them (no per-expert groups), so it has no transposed layout; use --layout fused"
        )
    mapping = mapping.for_config(ckpt.config)  # ops that read the config (heads of a rope permutation) bound to it
    model_keys = _rename_keys(ckpt, mapping, model_type)
    match = match_groups(mapping.all_groups, model_keys)
    layout = _source_layout(ckpt, mapping, match, model_type, source_layout)
    instances, first_key_of_inst = group_instances(ckpt, mapping, match, layout)
    outputs, passthrough = emit_outputs(ckpt, mapping, model_keys, match, instances, first_key_of_inst, layout, target, disk_names)
    names = [t.name for t in outputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MappingError(f"two outputs would be named {dup!r}; the {model_type} mapping does not fit this checkpoint")
    for t in outputs:
        _check_tiling(t)
    plan = Plan(model_type, mapping, layout, target, outputs, instances, passthrough)
    if layout is target:
        changed = sum(not _copied_unchanged(t) for t in outputs)
        plan.notes.append(
            f"the checkpoint is already in the {target} layout: tensors are copied through unchanged" if not changed else
            f"the experts are already in the {target} layout on disk; {changed} tensor(s) are renamed or converted to the model's form, the rest copied through unchanged"
        )
    return plan


def _copied_unchanged(t: OutTensor) -> bool:
    """The output is its one source tensor under the same name, byte for byte in place."""
    return t.sources == (t.name,) and all(isinstance(p, Copy) and p.key == t.name and p.src == p.dst for p in t.pieces)


def _rename_keys(ckpt: Checkpoint, mapping: MoEMapping, model_type: str) -> dict[str, str]:
    """Disk key -> model key for every tensor; the renaming must be invertible on this key set."""
    model_keys: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in ckpt.tensors:
        mk = mapping.to_model_key(key)
        back = mapping.to_disk_key(mk)
        if back != key and mapping.to_model_key(back) != mk:
            raise MappingError(
                f"key {key!r} renames to {mk!r}, which does not rename back; the {model_type} mapping cannot convert this checkpoint"
            )
        if mk in seen:
            raise MappingError(f"keys {seen[mk]!r} and {key!r} both map to {mk!r}; the checkpoint mixes naming schemes")
        seen[mk] = key
        model_keys[key] = mk
    return model_keys


def _source_layout(ckpt: Checkpoint, mapping: MoEMapping, match: GroupMatch, model_type: str, user_layout: Layout | None) -> Layout:
    """Only stacked (expert) groups decide the layout; non-stacked fusions follow their own keys."""
    groups = match.groups
    stacked_pe = [i for i in match.per_expert if groups[i[0]].stacked]
    stacked_fk = [i for i in match.fused_keys if groups[i[0]].stacked]
    if stacked_pe and stacked_fk:
        a = match.per_expert[stacked_pe[0]]
        a_key = next(iter(next(iter(a.values())).values()))
        raise MappingError(
            f"the checkpoint mixes per-expert keys ({a_key!r}) and fused keys ({match.fused_keys[stacked_fk[0]]!r}); convert it from a consistent copy"
        )
    recorded = _layout_from_records(ckpt)
    if stacked_pe:
        if user_layout not in (None, Layout.PER_EXPERT):
            raise MappingError(
                f"--source-layout {user_layout}, but the checkpoint's expert keys are per-expert; drop --source-layout"
            )
        return Layout.PER_EXPERT
    if stacked_fk:
        shapes = [(groups[i[0]], ckpt.tensors[match.fused_keys[i]].shape[1:], match.fused_keys[i]) for i in stacked_fk]
        record = None if recorded is None else recorded if recorded is not Layout.PER_EXPERT else Layout.FUSED
        return mapping.orient_fused(record, ckpt.config, shapes, user=user_layout)
    if any(g.stacked for g in mapping.groups):
        raise MappingError(
            f"no expert tensors of model_type {model_type!r} found (expected keys like {mapping.groups[0].parts[0]!r} or {mapping.groups[0].fused!r}); check --model-type"
        )
    return recorded or mapping.hub_layout


def _check_tiling(t: OutTensor) -> None:
    pos = 0
    for p in sorted(t.pieces, key=lambda p: p.dst):
        if p.dst != pos:
            raise AssertionError(f"internal error: pieces of {t.name!r} leave a gap or overlap at byte {pos}")
        pos += p.n
    if pos != t.nbytes:
        raise AssertionError(f"internal error: pieces of {t.name!r} cover {pos} of {t.nbytes} bytes")
