"""Planning, second half: the matched group instances of a checkpoint, validated, and the output tensors they emit.

Contract: `group_instances(ckpt, mapping, match, layout)` builds every `GroupInstance` (per-expert: complete experts of one
shape and dtype; fused: an expert count that agrees with the config, part shapes recorded by us or equal chunks)
and the first source key of each; `emit_outputs` lists the outputs in source order, a group's outputs where its
first source key stood, other tensors copied through (renamed only).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Container

from .checkpoint import Checkpoint
from .errors import MappingError
from .keys import GroupMatch
from .mapping import ExpertGroup, Layout, MoEMapping
from .ops import Shape
from .pieces import Copy, GroupInstance, OutTensor, Piece, Transform
from .safetensors_io import DTYPE_SIZES


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


def group_instances(
    ckpt: Checkpoint, mapping: MoEMapping, match: GroupMatch, layout: Layout
) -> tuple[list[GroupInstance], dict[tuple[int, tuple], str]]:
    """Every matched group instance, validated; and the first source key of each (where its outputs are emitted)."""
    cfg_experts = mapping.num_experts(ckpt.config)
    recorded_parts: dict[str, list] = (ckpt.sidecar or {}).get("parts", {}) if ckpt.sidecar else {}
    instances: list[GroupInstance] = []
    first_key_of_inst: dict[tuple[int, tuple], str] = {}
    for inst, experts in match.per_expert.items():
        g = match.groups[inst[0]]
        n_cfg = g.expert_count if g.expert_count is not None else cfg_experts
        instances.append(_per_expert_instance(ckpt, g, dict(inst[1]), experts, n_cfg))
        first_key_of_inst[inst] = min((k for e in experts.values() for k in e.values()), key=_order_index(ckpt))
    for inst, key in match.fused_keys.items():
        g, caps = match.groups[inst[0]], dict(inst[1])
        n_cfg = g.expert_count if g.expert_count is not None else cfg_experts
        instances.append(_fused_instance(ckpt, g, caps, key, layout, n_cfg, recorded_parts))
        first_key_of_inst[inst] = key
    return instances, first_key_of_inst


def _per_expert_instance(
    ckpt: Checkpoint, g: ExpertGroup, caps: dict, experts: dict[int, dict[int, str]], cfg_experts: int | None
) -> GroupInstance:
    fused_name = g.fused_template.format(**caps)
    present = sorted(experts)
    n_exp = 1 if not g.stacked else cfg_experts if cfg_experts is not None else present[-1] + 1
    off = g.expert_offset  # messages name on-disk indices
    missing = [e + off for e in _first_missing(experts, n_exp)]
    extra = [e + off for e in present if e >= n_exp]
    if missing or extra:
        what = f"missing expert(s) {missing}" if missing else f"expert index(es) {extra[:5]} beyond num_experts={n_exp}"
        where = f" from on-disk expert {off}" if off else ""
        raise MappingError(
            f"{fused_name!r}: {what} (found {len(present)} of num_experts={n_exp}{where}); the checkpoint is incomplete or its config is wrong"
        )
    shapes: list[Shape] | None = None
    dtype = None
    for e in range(n_exp):
        slot = experts[e]
        if len(slot) != len(g.parts):
            miss = [g.part_templates[p].format(**caps, expert=e + off) for p in range(len(g.parts)) if p not in slot]
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


def emit_outputs(
    ckpt: Checkpoint,
    mapping: MoEMapping,
    model_keys: dict[str, str],
    match: GroupMatch,
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
    g = gi.group
    if not g.stacked:  # a non-stacked fusion: parts or the fused tensor, never transposed, no expert dim
        # the disk side (the parts, or the fused tensor of `unfused_in_model`) for a per-expert target or the hub's
        # own layout in disk names (a hub layout may be fused), else the model side
        src = Layout.PER_EXPERT if gi.fused_key is None else Layout.FUSED
        disk_side = dst is Layout.PER_EXPERT or (disk_names and dst is mapping.hub_layout)
        dst = Layout.PER_EXPERT if disk_side != g.unfused_in_model else Layout.FUSED
    em = _InstanceEmitter(mapping, gi, src, disk_names)
    return em.parts() if dst is Layout.PER_EXPERT else [em.fused(dst)]


class _InstanceEmitter:
    """The output tensors of one group instance read in layout `src`: its parts per expert, or its fused tensor."""

    def __init__(self, mapping: MoEMapping, gi: GroupInstance, src: Layout, disk_names: bool) -> None:
        self.mapping, self.gi, self.g, self.src, self.disk_names = mapping, gi, gi.group, src, disk_names
        self.itemsize = DTYPE_SIZES[gi.dtype]
        self.part_nbytes = [math.prod(s) * self.itemsize for s in gi.part_shapes]
        self.expert_nbytes = sum(self.part_nbytes)
        E = gi.num_experts
        self.sources = tuple(k for e in range(E) for k in gi.parts[e]) if src is Layout.PER_EXPERT else (gi.fused_key,)

    def _name(self, model_name: str) -> str:
        return self.mapping.to_disk_key(model_name) if self.disk_names else model_name

    def part_source(self, e: int, p: int) -> tuple[str, int, int] | None:
        """Part p of expert e as a byte range of the source, or None when it needs a Transform."""
        gi = self.gi
        if self.src is Layout.PER_EXPERT:
            return (gi.parts[e][p], 0, self.part_nbytes[p])
        decode = self.g.chain(self.src, gi.part_shapes).inverse()
        if decode.is_byte_concat():
            return (gi.fused_key, e * self.expert_nbytes + sum(self.part_nbytes[:p]), self.part_nbytes[p])
        return None

    def expert_slice_input(self, e: int) -> tuple[str, int, int, Shape]:
        """Expert e's slice of the fused source tensor, as a Transform input."""
        shape = self.g.chain(self.src, self.gi.part_shapes).out_shapes(self.gi.part_shapes)[0]
        return (self.gi.fused_key, e * self.expert_nbytes, self.expert_nbytes, shape)

    def parts(self) -> list[OutTensor]:
        """One output per (expert, part)."""
        g, gi = self.g, self.gi
        decode = None if self.src is Layout.PER_EXPERT else g.chain(self.src, gi.part_shapes).inverse()
        outs = []
        for e in range(gi.num_experts):
            ex = e if g.stacked else None
            for p, tpl in enumerate(g.part_templates):
                rng = self.part_source(e, p)
                if rng is not None:
                    piece: Piece = Copy(rng[0], rng[1], rng[2], 0, ex)
                else:
                    piece = Transform((self.expert_slice_input(e),), decode, p, self.itemsize, 0, self.part_nbytes[p], ex)
                name = self._name(tpl.format(**gi.captures, expert=e + g.expert_offset))  # the on-disk index
                outs.append(OutTensor(name, gi.dtype, gi.part_shapes[p], [piece], g.fused if g.stacked else None, False, self.sources))
        return outs

    def fused(self, dst: Layout) -> OutTensor:
        """The fused tensor in layout `dst`: per expert a byte concatenation, a Transform of the parts, or a
        Transform of the source's own expert slice."""
        g, gi = self.g, self.gi
        encode = g.chain(dst, gi.part_shapes)
        expert_shape = encode.out_shapes(gi.part_shapes)[0]
        pieces = [self._fused_pieces(e, encode, dst) for e in range(gi.num_experts)]
        name = self._name(g.fused_template.format(**gi.captures))
        flat = [p for ps in pieces for p in ps]
        if not g.stacked:
            return OutTensor(name, gi.dtype, tuple(expert_shape), flat, None, False, self.sources)
        return OutTensor(name, gi.dtype, (gi.num_experts, *expert_shape), flat, g.fused, True, self.sources)

    def _fused_pieces(self, e: int, encode, dst: Layout) -> list[Piece]:  # noqa: ANN001 - a Chain
        g, gi = self.g, self.gi
        base, ex = e * self.expert_nbytes, (e if g.stacked else None)
        if self.src is dst and gi.fused_key is not None:  # the source holds this very layout: its bytes, copied
            return [Copy(gi.fused_key, base, self.expert_nbytes, base, ex)]
        ranges = [self.part_source(e, p) for p in range(len(g.parts))]
        if all(r is not None for r in ranges) and encode.is_byte_concat():
            out, off = [], base
            for r in ranges:
                out.append(Copy(r[0], r[1], r[2], off, ex))
                off += r[2]
            return out
        if all(r is not None for r in ranges):
            inputs = tuple((r[0], r[1], r[2], gi.part_shapes[p]) for p, r in enumerate(ranges))
            return [Transform(inputs, encode, 0, self.itemsize, base, self.expert_nbytes, ex)]
        decode = g.chain(self.src, gi.part_shapes).inverse()
        return [Transform((self.expert_slice_input(e),), decode.then(encode), 0, self.itemsize, base, self.expert_nbytes, ex)]
