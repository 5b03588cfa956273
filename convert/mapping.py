"""The mapping model: how a model type's checkpoint keys relate to transformers v5's fused in-memory layout.

A mapping is data (see `families/`): renamings that apply to every key, plus expert groups. Nothing here touches
tensor data.

Templates are full keys with named captures:
- `{prefix}`: any dotted path prefix, possibly empty (`model.`, `model.language_model.`, `thinker.model.`), so a
  remote-code wrapper around a known language model still maps; the rest of its keys pass through;
- `{layer}`, `{expert}`: decimal integers (parsed with `int`, so expert 10 sorts after expert 9);
- `{rest}`: any non-empty remainder (renamings only).

An `ExpertGroup` names, in MODEL naming (after renamings), the per-expert part keys (e.g. gate and up) and the fused
key they become. Its canonical per-expert content is the list of parts in `F.linear` convention (`[out, in]`).
Layouts encode that content:
- `per_expert`: each part its own key (the hub layout);
- `fused`: transformers v5's `[E, sum(out_p), in]`, i.e. per expert `cat(parts, 0)` (or the group's own `fused_ops`,
  e.g. gpt_oss's transposed interleave);
- `transposed`: the `x @ W` layout `[E, in, sum(out_p)]` (per expert the fused content transposed), which
  torchtitan / NeMo AutoModel train with and qwen3_vl_moe hub files use.
Renamings are inverted by swapping their two templates; the split mapping is derived, never written twice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cache, cached_property
from typing import Protocol

from .ops import Chain, Concat, Interleave, Op, Shape, Transpose

_CAPTURES = {
    "prefix": r"(?P<prefix>(?:[A-Za-z0-9_]+\.)*)",
    "layer": r"(?P<layer>\d+)",
    "expert": r"(?P<expert>\d+)",
    "rest": r"(?P<rest>.+)",
}
_FIELD = re.compile(r"\{(\w+)\}")


class Layout(str, Enum):
    PER_EXPERT = "per_expert"
    FUSED = "fused"
    TRANSPOSED = "transposed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Template:
    """A key template such as `{prefix}layers.{layer}.mlp.experts.{expert}.gate_proj.weight`."""

    text: str

    @cached_property
    def regex(self) -> re.Pattern[str]:
        out, pos = [], 0
        for m in _FIELD.finditer(self.text):
            out.append(re.escape(self.text[pos : m.start()]))
            if m.group(1) not in _CAPTURES:
                raise ValueError(f"unknown capture {{{m.group(1)}}} in template {self.text!r}")
            out.append(_CAPTURES[m.group(1)])
            pos = m.end()
        out.append(re.escape(self.text[pos:]))
        return re.compile("".join(out) + r"\Z")

    @cached_property
    def fields(self) -> frozenset[str]:
        return frozenset(_FIELD.findall(self.text))

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.match(key)
        return m.groupdict() if m else None

    def format(self, **captures: object) -> str:
        return _FIELD.sub(lambda m: str(captures[m.group(1)]), self.text)


@cache
def _template(text: str) -> Template:
    return Template(text)


@dataclass(frozen=True)
class Rename:
    """`disk` <-> `model` key templates with the same captures; each applies, in order, to every key it matches."""

    disk: str
    model: str

    def __post_init__(self) -> None:
        if Template(self.disk).fields != Template(self.model).fields:
            raise ValueError(f"rename {self.disk!r} -> {self.model!r}: both sides need the same captures")

    def to_model(self, key: str) -> str:
        caps = _template(self.disk).match(key)
        return key if caps is None else _template(self.model).format(**caps)

    def to_disk(self, key: str) -> str:
        caps = _template(self.model).match(key)
        return key if caps is None else _template(self.disk).format(**caps)


class KeyRenaming(Protocol):
    """Anything with `to_model(key)` and its inverse `to_disk(key)` (a `Rename`, or a translated transformers one)."""

    def to_model(self, key: str) -> str: ...

    def to_disk(self, key: str) -> str: ...


@dataclass(frozen=True, kw_only=True)
class ExpertGroup:
    """Per-expert `parts` (model naming, with `{expert}`) that fuse into one `fused` key.

    `fused_ops` turn the list of one expert's parts (F.linear `[out, in]` each) into that expert's slice of the fused
    tensor; the default concatenates the parts along dim 0 (gate then up), giving `[E, sum(out), in]`.
    `companions` are suffix pairs for tensors that fuse by the same rule: the block-FP8 scale grid
    `...gate_proj.weight_scale_inv` -> `...gate_up_proj_scale_inv`.
    `stacked=False` marks a non-expert fusion (parts without `{expert}`, e.g. kimi_linear's `q_conv1d|k_conv1d|
    v_conv1d -> conv1d`): once per layer, no expert dim, always the `fused` encoding (never transposed), not an
    expert tensor for expert parallelism, and it never decides the checkpoint's layout.
    `unfused_in_model=True` (non-stacked only) reverses the direction: the checkpoint stores `fused` and the model
    holds `parts` (transformers' one-to-many `Chunk`, e.g. a vision tower's `qkv_proj -> q_proj|k_proj|v_proj`), so
    merge writes the parts and split the fused tensor; a fused source splits into equal parts along the dim of the
    group's first op (`split_dim`).
    `expert_offset`/`expert_count`: the group's experts 0..count-1 are the on-disk (parts side) indices
    `[offset, offset + count)` (count None: every index from the offset on), for one on-disk expert list that holds
    several stacks (ernie4_5_vl_moe: the text experts, then the vision experts); split writes them back there.
    `expert_block=k` takes them from the config (`MoEMapping.for_config`): the k-th run of the mapping's
    `num_experts` on-disk indices (offset k*E, count E); until bound the group matches no expert key.
    """

    fused: str
    parts: tuple[str, ...]
    fused_ops: tuple[Op, ...] | None = None
    companions: tuple[tuple[str, str], ...] = ((".weight_scale_inv", "_scale_inv"),)
    stacked: bool = True
    unfused_in_model: bool = False
    expert_offset: int = 0
    expert_count: int | None = None
    expert_block: int | None = None

    @cached_property
    def fused_template(self) -> Template:
        return Template(self.fused)

    @cached_property
    def part_templates(self) -> tuple[Template, ...]:
        return tuple(Template(p) for p in self.parts)

    def ops_for(self, layout: Layout) -> tuple[Op, ...]:
        """Ops from the canonical list of parts to one expert's slice of the fused tensor in `layout`."""
        base = self.fused_ops if self.fused_ops is not None else ((Concat(0),) if len(self.parts) > 1 else ())
        if layout is Layout.FUSED or not self.stacked:
            return base
        if layout is Layout.TRANSPOSED:
            return base + (Transpose(0, 1),)
        raise ValueError(f"no fused ops for layout {layout}")

    @property
    def split_dim(self) -> int:
        """The dim a non-stacked fused tensor splits along into equal parts: that of the first op that joins parts."""
        return next((op.dim for op in self.ops_for(Layout.FUSED) if isinstance(op, (Concat, Interleave))), 0)

    @property
    def split_sizes(self) -> tuple[int, ...] | None:
        """The part sizes a non-stacked fused tensor splits into when a `Concat` of the group fixes them (bound from the
        config, e.g. transformers' `Split` sized by the model's parameters); None: equal parts."""
        return next((op.sizes for op in self.ops_for(Layout.FUSED) if isinstance(op, Concat) and op.sizes), None)

    def chain(self, layout: Layout, part_shapes: Sequence[Shape]) -> Chain:
        return Chain.bind(self.ops_for(layout), part_shapes)

    @property
    def bound(self) -> bool:
        """False while an `expert_block` waits for the config's E (`MoEMapping.for_config`)."""
        return self.expert_block is None or self.expert_count is not None

    def holds_expert(self, disk_index: int) -> bool:
        """Whether on-disk expert `disk_index` is one of this group's experts."""
        end = None if self.expert_count is None else self.expert_offset + self.expert_count
        return self.bound and self.expert_offset <= disk_index and (end is None or disk_index < end)

    def bind_experts(self, num_experts: int) -> ExpertGroup:
        """An `expert_block` group with its on-disk range taken from the config's E."""
        k = self.expert_block
        return self if k is None else replace(self, expert_offset=k * num_experts, expert_count=num_experts)

    def variants(self) -> list[ExpertGroup]:
        """This group and one per companion (same rule, suffixed keys)."""
        out = [self]
        for part_suffix, fused_suffix in self.companions:
            if all(p.endswith(".weight") for p in self.parts):
                out.append(
                    replace(
                        self,
                        fused=self.fused + fused_suffix,
                        parts=tuple(p[: -len(".weight")] + part_suffix for p in self.parts),
                        companions=(),
                    )
                )
        return out


def swiglu_groups(
    experts: str = "{prefix}layers.{layer}.mlp.experts",
    gate: str = "gate_proj",
    up: str = "up_proj",
    down: str = "down_proj",
) -> tuple[ExpertGroup, ...]:
    """The common pair: `gate|up -> gate_up_proj [E, 2I, H]`, `down -> down_proj [E, H, I]`."""
    return (
        ExpertGroup(
            fused=f"{experts}.gate_up_proj",
            parts=(f"{experts}.{{expert}}.{gate}.weight", f"{experts}.{{expert}}.{up}.weight"),
        ),
        ExpertGroup(fused=f"{experts}.down_proj", parts=(f"{experts}.{{expert}}.{down}.weight",)),
    )


def tensor_fusion(
    fused: str, parts: tuple[str, ...], fused_ops: tuple[Op, ...] | None = None, *, unfused_in_model: bool = False
) -> ExpertGroup:
    """A fusion that has nothing to do with experts: `parts` (no `{expert}`) concatenated into `fused` once per layer,
    e.g. kimi_linear's `q_conv1d|k_conv1d|v_conv1d -> conv1d` (an `ExpertGroup` with `stacked=False`);
    `unfused_in_model`: the checkpoint holds `fused`, the model the parts."""
    return ExpertGroup(fused=fused, parts=parts, fused_ops=fused_ops, companions=(), stacked=False, unfused_in_model=unfused_in_model)


@dataclass(frozen=True)
class KeptAsStored:
    """A tensor that converts as the checkpoint stores it although transformers' model holds only its first rows:
    transformers drops the others on load (the text config's `rows_field` gives how many it keeps) and pads zeros
    back on save (inkling2's `Inkling2UnpadVocab` on `lm_head.weight`). That op is not a bijection (non-zero padding
    would be lost) and changes the element count, so it is not inverted: the conversion keeps the stored tensor
    (lossless) under its name, and transformers drops the rows again when it loads the converted folder. `key`:
    model-naming template; `reason`: transformers' op, for the catalog and the tests."""

    key: str
    rows_field: str
    reason: str = ""

    @cached_property
    def template(self) -> Template:
        return Template(self.key)


@dataclass(frozen=True, kw_only=True)
class MoEMapping:
    """Everything the converter knows about one model type.

    - `renames`: disk key -> model key templates, applied in order to every key.
    - `groups`: expert groups in model naming. Empty when the hub layout already is the model's layout.
    - `disk_layout`: how hub checkpoints of this type store the groups (`per_expert`, or `fused`/`transposed`).
    - `expert_tensors`: model-naming templates of other tensors with a leading expert dim (biases, MXFP4 blocks),
      which expert parallelism shards like the fused weights.
    - `num_experts_fields` / `intermediate_fields`: config fields giving E and I (first present wins).
    - `not_experts`: model-naming templates of tensors under an `experts.` module that are not expert weights
      (a shared bias, a router); key coverage (dry runs) reports any other unclaimed `experts.` tensor.
    - `kept_as_stored`: tensors kept as the checkpoint stores them although transformers' model holds fewer rows
      (`KeptAsStored`: a load-time op with no exact inverse that transformers applies again to the converted folder).
    - `extra`: descriptive data for the catalog (`prefix`, `fused`).
    """

    model_type: str
    family: str
    groups: tuple[ExpertGroup, ...] = ()
    renames: tuple[KeyRenaming, ...] = ()
    disk_layout: Layout = Layout.PER_EXPERT
    expert_tensors: tuple[str, ...] = ()
    num_experts_fields: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    intermediate_fields: tuple[str, ...] = ("moe_intermediate_size", "intermediate_size")
    aliases: tuple[str, ...] = ()
    text_config_field: str | None = None  # multimodal configs keep the MoE fields under e.g. `text_config`
    notes: str = ""
    not_experts: tuple[str, ...] = ()
    kept_as_stored: tuple[KeptAsStored, ...] = ()
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def to_model_key(self, disk_key: str) -> str:
        for r in self.renames:
            disk_key = r.to_model(disk_key)
        return disk_key

    def to_disk_key(self, model_key: str) -> str:
        for r in reversed(self.renames):
            model_key = r.to_disk(model_key)
        return model_key

    def for_config(self, config: dict) -> MoEMapping:
        """This mapping with what reads the checkpoint's config bound to it: ops with `bind_config` (e.g.
        transformers' `PermuteForRope`, whose head count is a config field) and `expert_block` groups (their on-disk
        expert range, from E); itself when it has none."""
        if not any(hasattr(op, "bind_config") for g in self.groups for op in g.fused_ops or ()) and all(
            g.bound for g in self.groups
        ):
            return self
        groups = tuple(
            replace(g, fused_ops=tuple(op.bind_config(config) if hasattr(op, "bind_config") else op for op in g.fused_ops))
            if g.fused_ops
            else g
            for g in self.groups
        )
        if not all(g.bound for g in groups):
            groups = self._bind_expert_blocks(groups, config)
        return replace(self, groups=groups)

    def _bind_expert_blocks(self, groups: tuple[ExpertGroup, ...], config: dict) -> tuple[ExpertGroup, ...]:
        from .errors import MappingError

        e = self.num_experts(config)
        if e is None or e < 1:
            fields = " or ".join(self.num_experts_fields) or "its expert count"
            raise MappingError(
                f"config.json gives no {fields} (a positive integer): {self.model_type} keeps several stacks of experts in one on-disk list and E tells them apart"
            )
        return tuple(g.bind_experts(e) for g in groups)

    @cached_property
    def all_groups(self) -> tuple[ExpertGroup, ...]:
        return tuple(v for g in self.groups for v in g.variants())

    @property
    def hub_layout(self) -> Layout:
        """How hub checkpoints of this type store their expert groups (the declared `disk_layout`)."""
        return self.disk_layout

    @property
    def default_fused_layout(self) -> Layout:
        """The orientation of this type's fused checkpoints when nothing says otherwise: the hub's when the hub
        stores them fused or transposed, else transformers' `fused`."""
        return self.disk_layout if self.disk_layout is not Layout.PER_EXPERT else Layout.FUSED

    def config_value(self, config: dict, fields: Sequence[str]) -> int | None:
        for src in (config, config.get(self.text_config_field or "", None) or {}):
            for f in fields:
                v = src.get(f)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
        return None

    def num_experts(self, config: dict) -> int | None:
        return self.config_value(config, self.num_experts_fields)

    def orient_fused(
        self,
        recorded: Layout | None,
        config: dict,
        shapes: Sequence[tuple[ExpertGroup, Shape, str]],
        user: Layout | None = None,
    ) -> Layout:
        """The layout of a checkpoint whose stacked groups are stored fused (`shapes`: group, one expert's shape, key).

        Shapes are checked the way transformers does (`Transpose(check_dims=True)`), against H (`hidden_size`) and I
        from the config: one expert's down projection reads `[H, I]` and the others `[n*I, H]` in the fused
        orientation, the reverse when transposed; the checkpoint's orientation is one that every tensor fits. The
        user's `--source-layout`, else the recorded layout (our sidecar or safetensors metadata), decides when the
        shapes confirm it. Without either: the one orientation that fits; refused when none fits, or when both fit
        (2I == H; a square down projection alone, I == H, is decided by gate_up) for a type whose fused checkpoints
        exist in both orientations (a transposed hub layout beside transformers' own save); otherwise the declared
        layout. A config without H or I: the user's or recorded layout, else the declared one unless transposed.
        """
        from .errors import MappingError

        if user is Layout.PER_EXPERT:
            raise MappingError("--source-layout per_expert, but the checkpoint's expert tensors are fused; use fused or transposed")
        declared = self.default_fused_layout
        given, source = (user, "--source-layout") if user is not None else (recorded, "recorded layout")
        fits = self._fitting_orientations(config, shapes)
        if given is not None:
            if fits is not None and given not in fits:
                raise MappingError(
                    f"the {source} {given} does not fit the expert shapes (they fit {sorted(map(str, fits))}); check --source-layout and config.json"
                )
            return given
        if fits is None and declared is Layout.TRANSPOSED:
            raise MappingError(
                f"cannot tell whether the {self.model_type} fused experts are stored [E, 2I, H] (fused) or [E, H, 2I] (transposed): config.json lacks the hidden or expert intermediate size; pass --source-layout fused or --source-layout transposed"
            )
        if fits is not None and len(fits) == 1:
            return next(iter(fits))
        if fits is not None and declared is Layout.TRANSPOSED:
            raise MappingError(
                f"{self.model_type}: the fused expert shapes fit both the transposed hub layout and transformers' own (2I == H), so the orientation is ambiguous; pass --source-layout fused or --source-layout transposed"
            )
        return declared

    def _fitting_orientations(
        self, config: dict, shapes: Sequence[tuple[ExpertGroup, Shape, str]]
    ) -> set[Layout] | None:
        """The orientations every fused tensor fits given the config's H and I (None: the config lacks them)."""
        from .errors import MappingError

        h = self.config_value(config, ("hidden_size",))
        i = self.config_value(config, self.intermediate_fields)
        if h is None or i is None:
            return None
        fits = {Layout.FUSED, Layout.TRANSPOSED}
        for g, shape, key in shapes:
            if not all(p.endswith(".weight") for p in g.parts):
                continue  # a companion (block-FP8 scale grid): its shape is not in I and H
            fits &= {lay for lay in (Layout.FUSED, Layout.TRANSPOSED) if _orientation_fits(g, shape, lay, h, i)}
            if not fits:
                raise MappingError(
                    f"fused tensor {key!r} has expert shape {list(shape)}, which fits neither the fused nor the transposed orientation for H={h}, I={i}; the checkpoint and its config disagree"
                )
        return fits


def _orientation_fits(group: ExpertGroup, expert_shape: Shape, layout: Layout, hidden: int, inter: int) -> bool:
    """Whether one expert's slice `expert_shape` reads, in `layout`, as parts of the expected F.linear shape:
    `[H, I]` for a down projection, `[I, H]` for the others (gate, up). A non-matrix is never transposed."""
    if len(expert_shape) != 2:
        return layout is Layout.FUSED
    out_total, in_dim = expert_shape if layout is Layout.FUSED else expert_shape[::-1]
    n = len(group.parts)
    if out_total % n:
        return False
    is_down = group.fused.rsplit(".", 1)[-1].startswith("down")
    return (out_total // n, in_dim) == ((hidden, inter) if is_down else (inter, hidden))
