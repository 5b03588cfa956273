"""The one key matcher: which expert group (and expert, and part) a model key belongs to, for planning, key
coverage and dry runs.

Contract: `match_key(groups, model_key)` returns the group instance `(group index, captures)`, the expert index
(None for a fused tensor) and the part index, or None when no group claims the key; `match_groups` applies it to a
checkpoint's keys (refusing a duplicated expert); `key_coverage` classifies a key list by names alone
(`inspect --dry-run`: config + index, no weights).
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field

from .errors import MappingError
from .mapping import ExpertGroup, Layout, MoEMapping, Template


@dataclass
class GroupMatch:
    """Keys matched to group instances `(group index, captures)`: per expert (expert -> part -> key) or fused."""

    groups: tuple[ExpertGroup, ...]
    per_expert: dict[tuple[int, tuple], dict[int, dict[int, str]]]
    fused_keys: dict[tuple[int, tuple], str]
    group_of: dict[str, tuple[int, tuple]]


def match_key(groups: tuple[ExpertGroup, ...], model_key: str) -> tuple[tuple[int, tuple], int | None, int] | None:
    """The one key matcher (planning, key coverage, dry runs): the group instance `(group index, captures)` a model
    key belongs to, with its expert and part index, or expert None for a fused tensor; None if no group claims it.

    The expert index is the group's own (the on-disk index less its `expert_offset`): a part key goes to the group
    whose on-disk range holds its index; an index beyond every range goes to the matching group that starts last
    (as its expert `count` or more, which its instance then refuses as beyond num_experts)."""
    beyond: tuple[tuple[int, tuple], int, int] | None = None
    for gi, g in enumerate(groups):
        for pi, tpl in enumerate(g.part_templates):
            caps = tpl.match(model_key)
            if caps is None:
                continue
            e = int(caps.pop("expert", 0))  # a non-stacked group has one "expert"
            hit = (gi, tuple(sorted(caps.items()))), e - g.expert_offset, pi
            if g.holds_expert(e):
                return hit
            if g.bound and e >= g.expert_offset and (beyond is None or g.expert_offset > groups[beyond[0][0]].expert_offset):
                beyond = hit
        caps = g.fused_template.match(model_key)
        if caps is not None:
            return (gi, tuple(sorted(caps.items()))), None, 0
    return beyond


def match_groups(groups: tuple[ExpertGroup, ...], model_keys: dict[str, str]) -> GroupMatch:
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
    return GroupMatch(groups, per_expert, fused_keys, group_of)


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
    mapping = mapping.for_config(config)  # expert blocks (one on-disk list of several stacks) need the config's E
    cov = KeyCoverage(model_type, None, len(keys))
    per_expert, fused = _classify_keys(keys, mapping, cov)
    _coverage_layout(cov, mapping, per_expert, fused, model_type)
    _coverage_groups(cov, mapping, per_expert, fused, mapping.num_experts(config))
    return cov


def _classify_keys(keys: list[str], mapping: MoEMapping, cov: KeyCoverage) -> tuple[dict, dict]:
    """Count pass-through, renamed and expert-template keys into `cov` (and rename problems); returns the group
    instances' per-expert parts seen (`{instance: {expert: {part index}}}`) and fused keys (`{instance: key}`)."""
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
        elif any(t.match(mk) is not None for t in expert_tpls):
            cov.expert_tensors += 1
        elif _EXPERT_LIKE.search(mk) and not any(t.match(mk) is not None for t in known_tpls):
            cov.unmapped.append(key)
        else:
            cov.passthrough += 1
            cov.renamed += mk != key
    return per_expert, fused


def _coverage_layout(cov: KeyCoverage, mapping: MoEMapping, per_expert: dict, fused: dict, model_type: str) -> None:
    """The experts' layout from the stacked groups' keys (per-expert, fused, mixed or missing)."""
    groups = mapping.all_groups
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


def _coverage_groups(cov: KeyCoverage, mapping: MoEMapping, per_expert: dict, fused: dict, cfg_experts: int | None) -> None:
    """One row per group (instances, E, keys); incomplete experts or experts beyond num_experts are problems."""
    groups = mapping.all_groups
    for inst, experts in per_expert.items():
        g = groups[inst[0]]
        name = g.fused_template.format(**dict(inst[1]))
        n_cfg = g.expert_count if g.expert_count is not None else cfg_experts
        n = 1 if not g.stacked else n_cfg if n_cfg is not None else max(experts) + 1
        off = g.expert_offset  # problems name on-disk indices
        missing = [e + off for e in itertools.islice((e for e in range(n) if len(experts.get(e, ())) != len(g.parts)), 5)]
        extra = [e + off for e in experts if e >= n]
        if missing or extra:
            cov.problems.append(
                f"{name!r}: "
                + (f"experts {missing[:5]} incomplete" if missing else f"experts {extra[:5]} beyond num_experts={n}")
            )
        row = cov.groups.setdefault(g.fused, {"fused": g.fused, "parts": list(g.parts), "instances": 0, "experts": n, "keys": 0})
        row["instances"] += 1
        row["keys"] += sum(len(p) for p in experts.values())
    for inst in fused:
        g = groups[inst[0]]
        row = cov.groups.setdefault(g.fused, {"fused": g.fused, "parts": list(g.parts), "instances": 0,
                                              "experts": cfg_experts if g.stacked else 1, "keys": 0})
        row["instances"] += 1
        row["keys"] += 1
