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

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Container
from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .errors import MappingError
from .mapping import ExpertGroup, Layout, MoEMapping, Template
from .ops import Chain, Shape
from .safetensors_io import DTYPE_SIZES

LAYOUT_METADATA_KEY = "automodel_convert.layout"


@dataclass(frozen=True)
class Copy:
    key: str
    src: int
    n: int
    dst: int
    expert: int | None = None


@dataclass(frozen=True)
class Transform:
    inputs: tuple[tuple[str, int, int, Shape], ...]  # (source key, byte offset, nbytes, shape)
    chain: Chain
    select: int
    itemsize: int
    dst: int
    n: int
    expert: int | None = None


Piece = Copy | Transform


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: Shape
    pieces: list[Piece]
    group: str | None = None  # fused template of the group this tensor belongs to (None: pass-through)
    fused: bool = False  # True when dim 0 is the expert dim of a fused tensor
    sources: tuple[str, ...] = ()  # source keys consumed

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class GroupInstance:
    """One group in one layer: the experts' part keys (per-expert source) or the fused key (fused source)."""

    group: ExpertGroup
    captures: dict[str, str]
    num_experts: int
    part_shapes: list[Shape]
    dtype: str
    parts: dict[int, list[str]] = field(default_factory=dict)  # expert -> part keys (per-expert source)
    fused_key: str | None = None  # fused source


@dataclass
class Plan:
    model_type: str
    mapping: MoEMapping
    source_layout: Layout
    target_layout: Layout
    outputs: list[OutTensor]
    instances: list[GroupInstance]
    passthrough: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs if t.group is not None)


def _layout_from_records(ckpt: Checkpoint) -> Layout | None:
    if ckpt.sidecar and ckpt.sidecar.get("layout"):
        return Layout(ckpt.sidecar["layout"])
    for h in ckpt.files.values():
        if h.metadata and LAYOUT_METADATA_KEY in h.metadata:
            return Layout(h.metadata[LAYOUT_METADATA_KEY])
    return None


def _fmt_keys(keys: list[str], n: int = 2) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _chunk_shapes(
    group: ExpertGroup, layout: Layout, expert_shape: Shape, recorded: list | None, key: str
) -> list[Shape]:
    """Part shapes of one expert of a fused tensor: recorded by us (checked against the tensor), or equal chunks of
    the fused output dim."""
    if recorded is not None:
        shapes = [tuple(s) for s in recorded]
        try:
            fits = len(shapes) == len(group.parts) and group.chain(layout, shapes).out_shapes(shapes)[0] == tuple(
                expert_shape
            )
        except (ValueError, IndexError):
            fits = False
        if not fits:
            raise MappingError(
                f"automodel_convert.json records parts {[list(x) for x in shapes]} for {key!r}, which do not make its expert shape {list(expert_shape)} in the {layout} layout; the sidecar was edited: restore it"
            )
        return shapes
    n = len(group.parts)
    if len(expert_shape) != 2 and (layout is not Layout.FUSED or not expert_shape):
        raise MappingError(f"fused tensor {key!r} has expert shape {list(expert_shape)}; expected 2 dims")
    out_dim = 0 if layout is Layout.FUSED else 1
    sizes = None
    if not group.stacked:  # a non-expert fusion joins its parts along the dim of its first op, in sizes it may fix
        out_dim, sizes = group.split_dim % max(len(expert_shape), 1), group.split_sizes
    total = expert_shape[out_dim]
    if sizes is not None:
        if len(sizes) != n or sum(sizes) != total:
            raise MappingError(f"fused tensor {key!r}: dim {out_dim} ({total}) does not split into the config's sizes {list(sizes)}")
        return [tuple(z if d == out_dim else m for d, m in enumerate(expert_shape)) for z in sizes]
    if total % n:
        raise MappingError(
            f"fused tensor {key!r}: dim {out_dim + 1} ({total}) does not split into {n} equal parts; the checkpoint is not in the {layout} layout"
        )
    # Canonical parts are F.linear [out, in] (or any [out, ...] for the fused layout); the fused layouts are
    # cat(parts, 0) (+ a transpose).
    if layout is Layout.FUSED:
        base = [tuple(total // n if d == out_dim else m for d, m in enumerate(expert_shape))] * n
    else:
        base = [(total // n, expert_shape[0])] * n
    chain = group.chain(layout, base)
    if chain.out_shapes(base)[0] != tuple(expert_shape):
        raise MappingError(
            f"fused tensor {key!r}: shape {list(expert_shape)} does not fit the {layout} layout of its group"
        )
    return base


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
    match = _match_groups(mapping.all_groups, model_keys)
    layout = _source_layout(ckpt, mapping, match, model_type, source_layout)
    instances, first_key_of_inst = _instances(ckpt, mapping, match, layout)
    outputs, passthrough = _emit_outputs(ckpt, mapping, model_keys, match, instances, first_key_of_inst, layout, target, disk_names)
    names = [t.name for t in outputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MappingError(f"two outputs would be named {dup!r}; the {model_type} mapping does not fit this checkpoint")
    for t in outputs:
        _check_tiling(t)
    plan = Plan(model_type, mapping, layout, target, outputs, instances, passthrough)
    if layout is target:
        plan.notes.append(f"the checkpoint is already in the {target} layout: tensors are copied through unchanged")
    return plan


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


@dataclass
class _GroupMatch:
    """Keys matched to group instances `(group index, captures)`: per expert (expert -> part -> key) or fused."""

    groups: tuple[ExpertGroup, ...]
    per_expert: dict[tuple[int, tuple], dict[int, dict[int, str]]]
    fused_keys: dict[tuple[int, tuple], str]
    group_of: dict[str, tuple[int, tuple]]


def match_key(groups: tuple[ExpertGroup, ...], model_key: str) -> tuple[tuple[int, tuple], int | None, int] | None:
    """The one key matcher (planning, key coverage, dry runs): the group instance `(group index, captures)` a model
    key belongs to, with its expert and part index, or expert None for a fused tensor; None if no group claims it."""
    for gi, g in enumerate(groups):
        for pi, tpl in enumerate(g.part_templates):
            caps = tpl.match(model_key)
            if caps is not None:
                e = int(caps.pop("expert", 0))  # a non-stacked group has one "expert"
                return (gi, tuple(sorted(caps.items()))), e, pi
        caps = g.fused_template.match(model_key)
        if caps is not None:
            return (gi, tuple(sorted(caps.items()))), None, 0
    return None


def _match_groups(groups: tuple[ExpertGroup, ...], model_keys: dict[str, str]) -> _GroupMatch:
    per_expert: dict[tuple[int, tuple], dict[int, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    fused_keys: dict[tuple[int, tuple], str] = {}
    group_of: dict[str, tuple[int, tuple]] = {}
    for key, mk in model_keys.items():
        hit = match_key(groups, mk)
        if hit is None:
            continue
        inst, e, pi = hit
        group_of[key] = inst
        if e is None:
            fused_keys[inst] = key
            continue
        slot = per_expert[inst][e]
        if pi in slot:
            g = groups[inst[0]]
            raise MappingError(
                f"expert {e} appears twice in {g.fused_template.format(**dict(inst[1]))!r}: {slot[pi]!r} and {key!r}; remove the duplicate"
            )
        slot[pi] = key
    return _GroupMatch(groups, per_expert, fused_keys, group_of)


def _source_layout(ckpt: Checkpoint, mapping: MoEMapping, match: _GroupMatch, model_type: str, user_layout: Layout | None) -> Layout:
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


def _instances(
    ckpt: Checkpoint, mapping: MoEMapping, match: _GroupMatch, layout: Layout
) -> tuple[list[GroupInstance], dict[tuple[int, tuple], str]]:
    """Every matched group instance, validated; and the first source key of each (where its outputs are emitted)."""
    cfg_experts = mapping.num_experts(ckpt.config)
    recorded_parts: dict[str, list] = (ckpt.sidecar or {}).get("parts", {}) if ckpt.sidecar else {}
    instances: list[GroupInstance] = []
    first_key_of_inst: dict[tuple[int, tuple], str] = {}
    for inst, experts in match.per_expert.items():
        instances.append(_per_expert_instance(ckpt, match.groups[inst[0]], dict(inst[1]), experts, cfg_experts))
        first_key_of_inst[inst] = min((k for e in experts.values() for k in e.values()), key=_order_index(ckpt))
    for inst, key in match.fused_keys.items():
        g, caps = match.groups[inst[0]], dict(inst[1])
        instances.append(_fused_instance(ckpt, g, caps, key, layout, cfg_experts, recorded_parts))
        first_key_of_inst[inst] = key
    return instances, first_key_of_inst


def _per_expert_instance(
    ckpt: Checkpoint, g: ExpertGroup, caps: dict, experts: dict[int, dict[int, str]], cfg_experts: int | None
) -> GroupInstance:
    fused_name = g.fused_template.format(**caps)
    present = sorted(experts)
    n_exp = 1 if not g.stacked else cfg_experts if cfg_experts is not None else present[-1] + 1
    missing = _first_missing(experts, n_exp)
    extra = [e for e in present if e >= n_exp]
    if missing or extra:
        what = f"missing expert(s) {missing}" if missing else f"expert index(es) {extra[:5]} beyond num_experts={n_exp}"
        raise MappingError(
            f"{fused_name!r}: {what} (found {len(present)} of num_experts={n_exp}); the checkpoint is incomplete or its config is wrong"
        )
    shapes: list[Shape] | None = None
    dtype = None
    for e in range(n_exp):
        slot = experts[e]
        if len(slot) != len(g.parts):
            miss = [g.part_templates[p].format(**caps, expert=e) for p in range(len(g.parts)) if p not in slot]
            raise MappingError(f"{fused_name!r}: expert {e} lacks {_fmt_keys(miss)}; the checkpoint is incomplete")
        infos = [ckpt.tensors[slot[p]] for p in range(len(g.parts))]
        s = [t.shape for t in infos]
        if shapes is None:
            shapes, dtype = s, infos[0].dtype
            ref_key = slot[0]
        if s != shapes or any(t.dtype != dtype for t in infos):
            bad = next(t for t in infos if t.shape not in shapes or t.dtype != dtype)
            raise MappingError(
                f"experts of {fused_name!r} differ: {bad.name!r} is {bad.dtype}{list(bad.shape)} but {ref_key!r} is {dtype}{list(shapes[0])}; the checkpoint is inconsistent"
            )
    try:
        g.chain(Layout.FUSED, shapes)
    except ValueError as e:
        raise MappingError(f"{fused_name!r}: parts cannot be fused ({e})") from e
    parts = {e: [experts[e][p] for p in range(len(g.parts))] for e in range(n_exp)}
    return GroupInstance(g, caps, n_exp, shapes, dtype, parts=parts)


def _fused_instance(
    ckpt: Checkpoint, g: ExpertGroup, caps: dict, key: str, layout: Layout, cfg_experts: int | None, recorded_parts: dict
) -> GroupInstance:
    info = ckpt.tensors[key]
    fused_model_name = g.fused_template.format(**caps)
    if not g.stacked:
        shapes = _chunk_shapes(g, Layout.FUSED, info.shape, recorded_parts.get(fused_model_name), key)
        return GroupInstance(g, caps, 1, shapes, info.dtype, fused_key=key)
    if len(info.shape) < 2:
        raise MappingError(f"fused tensor {key!r} has shape {list(info.shape)}; expected [experts, ...]")
    n_exp = info.shape[0]
    if cfg_experts is not None and n_exp != cfg_experts:
        raise MappingError(
            f"fused tensor {key!r} holds {n_exp} experts but the config says {cfg_experts}; the checkpoint and config disagree"
        )
    shapes = _chunk_shapes(g, layout, info.shape[1:], recorded_parts.get(fused_model_name), key)
    return GroupInstance(g, caps, n_exp, shapes, info.dtype, fused_key=key)


def _emit_outputs(
    ckpt: Checkpoint,
    mapping: MoEMapping,
    model_keys: dict[str, str],
    match: _GroupMatch,
    instances: list[GroupInstance],
    first_key_of_inst: dict[tuple[int, tuple], str],
    layout: Layout,
    target: Layout,
    disk_names: bool,
) -> tuple[list[OutTensor], list[str]]:
    """Outputs in source order: a group's outputs where its first source key stood, other tensors copied through."""
    inst_by_first = {first_key_of_inst[i]: inst for i, inst in zip(first_key_of_inst, instances)}
    outputs: list[OutTensor] = []
    passthrough: list[str] = []
    for key in sorted(ckpt.tensors, key=_order_index(ckpt)):
        if key in match.group_of:
            if key in inst_by_first:
                outputs.extend(_emit_instance(mapping, inst_by_first[key], layout, target, disk_names))
            continue
        info = ckpt.tensors[key]
        name = mapping.to_disk_key(model_keys[key]) if disk_names else model_keys[key]
        outputs.append(OutTensor(name, info.dtype, info.shape, [Copy(key, 0, info.nbytes, 0)], sources=(key,)))
        passthrough.append(key)
    return outputs, passthrough


def _first_missing(present: Container[int], n: int, limit: int = 5) -> list[int]:
    """The first `limit` indices below `n` not in `present`, without building a list of `n` (a config may say 10^9)."""
    return list(itertools.islice((e for e in range(n) if e not in present), limit))


def _order_index(ckpt: Checkpoint):
    files = {f: i for i, f in enumerate(ckpt.files)}
    return lambda k: (files[ckpt.tensors[k].file], ckpt.tensors[k].start)


def _emit_instance(
    mapping: MoEMapping, gi: GroupInstance, src: Layout, dst: Layout, disk_names: bool
) -> list[OutTensor]:
    g, caps, E = gi.group, gi.captures, gi.num_experts
    if not g.stacked:  # a non-stacked fusion: parts or the fused tensor, never transposed, no expert dim
        # the disk side (the parts, or the fused tensor of `unfused_in_model`) for a per-expert target or the hub's
        # own layout in disk names (a hub layout may be fused), else the model side
        src = Layout.PER_EXPERT if gi.fused_key is None else Layout.FUSED
        disk_side = dst is Layout.PER_EXPERT or (disk_names and dst is mapping.hub_layout)
        dst = Layout.PER_EXPERT if disk_side != g.unfused_in_model else Layout.FUSED
    itemsize = DTYPE_SIZES[gi.dtype]
    part_nbytes = [math.prod(s) * itemsize for s in gi.part_shapes]
    expert_nbytes = sum(part_nbytes)

    # How to get part p of expert e from the source: a byte range, or a Transform of the source's expert slice.
    def part_source(e: int, p: int) -> tuple[str, int, int] | None:
        if src is Layout.PER_EXPERT:
            return (gi.parts[e][p], 0, part_nbytes[p])
        decode = g.chain(src, gi.part_shapes).inverse()
        if decode.is_byte_concat():
            return (gi.fused_key, e * expert_nbytes + sum(part_nbytes[:p]), part_nbytes[p])
        return None

    def expert_slice_input(e: int) -> tuple[str, int, int, Shape]:
        shape = g.chain(src, gi.part_shapes).out_shapes(gi.part_shapes)[0]
        return (gi.fused_key, e * expert_nbytes, expert_nbytes, shape)

    sources = tuple(k for e in range(E) for k in gi.parts[e]) if src is Layout.PER_EXPERT else (gi.fused_key,)
    if dst is Layout.PER_EXPERT:
        outs = []
        decode = None if src is Layout.PER_EXPERT else g.chain(src, gi.part_shapes).inverse()
        for e in range(E):
            for p, tpl in enumerate(g.part_templates):
                name = tpl.format(**caps, expert=e)
                name = mapping.to_disk_key(name) if disk_names else name
                rng = part_source(e, p)
                ex = e if g.stacked else None
                if rng is not None:
                    piece: Piece = Copy(rng[0], rng[1], rng[2], 0, ex)
                else:
                    piece = Transform((expert_slice_input(e),), decode, p, itemsize, 0, part_nbytes[p], ex)
                outs.append(
                    OutTensor(
                        name, gi.dtype, gi.part_shapes[p], [piece], g.fused if g.stacked else None, False, sources
                    )
                )
        return outs

    encode = g.chain(dst, gi.part_shapes)
    expert_shape = encode.out_shapes(gi.part_shapes)[0]
    pieces: list[Piece] = []
    for e in range(E):
        base = e * expert_nbytes
        ex = e if g.stacked else None
        ranges = [part_source(e, p) for p in range(len(g.parts))]
        if all(r is not None for r in ranges) and encode.is_byte_concat():
            off = base
            for r in ranges:
                pieces.append(Copy(r[0], r[1], r[2], off, ex))
                off += r[2]
        elif all(r is not None for r in ranges):
            inputs = tuple((r[0], r[1], r[2], gi.part_shapes[p]) for p, r in enumerate(ranges))
            pieces.append(Transform(inputs, encode, 0, itemsize, base, expert_nbytes, ex))
        else:
            decode = g.chain(src, gi.part_shapes).inverse()
            pieces.append(
                Transform((expert_slice_input(e),), decode.then(encode), 0, itemsize, base, expert_nbytes, ex)
            )
    name = g.fused_template.format(**caps)
    if disk_names:
        name = mapping.to_disk_key(name)
    if not g.stacked:
        return [OutTensor(name, gi.dtype, tuple(expert_shape), pieces, None, False, sources)]
    return [OutTensor(name, gi.dtype, (E, *expert_shape), pieces, g.fused, True, sources)]


def _check_tiling(t: OutTensor) -> None:
    pos = 0
    for p in sorted(t.pieces, key=lambda p: p.dst):
        if p.dst != pos:
            raise AssertionError(f"internal error: pieces of {t.name!r} leave a gap or overlap at byte {pos}")
        pos += p.n
    if pos != t.nbytes:
        raise AssertionError(f"internal error: pieces of {t.name!r} cover {pos} of {t.nbytes} bytes")


# ---------------------------------------------------------------- key coverage (dry run: names only, no shapes)

_EXPERT_LIKE = re.compile(r"(?:^|\.)experts\.")


@dataclass
class KeyCoverage:
    """What a mapping makes of a checkpoint's key names alone (`inspect --dry-run`: config + index, no weights)."""

    model_type: str
    layout: Layout | None  # detected from the expert groups' keys (None: no expert group matched)
    keys: int
    groups: dict[str, dict] = field(default_factory=dict)  # fused template -> instances, experts, keys
    renamed: int = 0
    expert_tensors: int = 0
    passthrough: int = 0
    unmapped: list[str] = field(default_factory=list)  # expert-looking keys that nothing claims
    problems: list[str] = field(default_factory=list)  # incomplete experts, mixed layouts, clashing names

    @property
    def complete(self) -> bool:
        return not self.unmapped and not self.problems


def key_coverage(keys: list[str], mapping: MoEMapping, config: dict, *, model_type: str | None = None) -> KeyCoverage:
    """Classify every key: an expert-group part or fused tensor, an `expert_tensors` tensor, a (renamed)
    pass-through, or unmapped: a key under an `experts.` module that no group or template of the mapping claims."""
    model_type = model_type or mapping.model_type
    cov = KeyCoverage(model_type, None, len(keys))
    groups = mapping.all_groups
    expert_tpls = [Template(t) for t in mapping.expert_tensors]
    known_tpls = [Template(t) for t in mapping.not_experts]
    per_expert: dict[tuple[int, tuple], dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    fused: dict[tuple[int, tuple], str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        mk = mapping.to_model_key(key)
        if mapping.to_disk_key(mk) != key and mapping.to_model_key(mapping.to_disk_key(mk)) != mk:
            cov.problems.append(f"{key!r} renames to {mk!r}, which does not rename back")
        if mk in seen:
            cov.problems.append(f"{seen[mk]!r} and {key!r} both map to {mk!r}")
        seen[mk] = key
        hit = match_key(groups, mk)
        if hit is not None:
            inst, e, pi = hit
            if e is None:
                fused[inst] = key
            else:
                per_expert[inst][e].add(pi)
            continue
        if any(t.match(mk) is not None for t in expert_tpls):
            cov.expert_tensors += 1
        elif _EXPERT_LIKE.search(mk) and not any(t.match(mk) is not None for t in known_tpls):
            cov.unmapped.append(key)
        else:
            cov.passthrough += 1
            cov.renamed += mk != key

    stacked_pe = [i for i in per_expert if groups[i[0]].stacked]
    stacked_fk = [i for i in fused if groups[i[0]].stacked]
    if stacked_pe and stacked_fk:
        cov.problems.append("the checkpoint mixes per-expert and fused expert keys")
    if stacked_pe:
        cov.layout = Layout.PER_EXPERT
    elif stacked_fk:
        cov.layout = mapping.default_fused_layout
    elif any(g.stacked for g in mapping.groups):
        cov.problems.append(
            f"no expert tensors of model_type {model_type!r} found (expected keys like {mapping.groups[0].parts[0]!r})"
        )
    cfg_experts = mapping.num_experts(config)
    for inst, experts in per_expert.items():
        g = groups[inst[0]]
        name = g.fused_template.format(**dict(inst[1]))
        n = 1 if not g.stacked else cfg_experts if cfg_experts is not None else max(experts) + 1
        missing = list(itertools.islice((e for e in range(n) if len(experts.get(e, ())) != len(g.parts)), 5))
        extra = [e for e in experts if e >= n]
        if missing or extra:
            cov.problems.append(
                f"{name!r}: "
                + (f"experts {missing[:5]} incomplete" if missing else f"experts {extra[:5]} beyond num_experts={n}")
            )
        row = cov.groups.setdefault(
            g.fused, {"fused": g.fused, "parts": list(g.parts), "instances": 0, "experts": n, "keys": 0}
        )
        row["instances"] += 1
        row["keys"] += sum(len(p) for p in experts.values())
    for inst in fused:
        g = groups[inst[0]]
        row = cov.groups.setdefault(
            g.fused,
            {
                "fused": g.fused,
                "parts": list(g.parts),
                "instances": 0,
                "experts": cfg_experts if g.stacked else 1,
                "keys": 0,
            },
        )
        row["instances"] += 1
        row["keys"] += 1
    return cov
