"""The generic path: a `MoEMapping` translated from the installed transformers' own declared conversions.

Contract:
- `fused_expert_types()` walks transformers' config registry and returns every model type whose modeling file
  declares fused experts (`@use_experts_implementation`), with the class used to build it (conditional generation,
  then causal LM, then base model).
- `generic_mapping(model_type)` builds that class on the meta device from its default config (no weights, no
  download), asks transformers for the transforms it applies on load (`get_model_conversion_mapping`, scopes
  included), and translates them into our data:
  - `WeightRenaming` -> `TransformersRename` (keyword-argument data; `to_model` is transformers' own renaming,
    `to_disk` its own `reverse_transform`, and a key that does not come back exactly is refused);
  - `WeightConverter(MergeModulelist(0), Concatenate(1))` -> `ExpertGroup` parts `[gate, up]` with `Concat(0)`
    (every op after `MergeModulelist(0)` acts on dim d of the stack, i.e. dim d-1 of one expert: `Concatenate` and
    `Transpose` become `Concat` and `Transpose`; transformers' `Interleave` is not translated, no supported type
    needs it and nothing here tests it); the split direction is the group's derived inverse, never declared;
  - `WeightConverter(Concatenate(d))` without `MergeModulelist` -> a non-stacked group (e.g. q/k/v conv1d);
  - `ErnieFuseAndSplitTextVisionExperts` (one on-disk expert list cut into a text and a vision stack) -> one group
    per stack taking its run of the on-disk indices (`expert_block`, E from the config field behind `num_experts`);
  - a converter that only drops padding rows of a tensor keeping its name (`Inkling2UnpadVocab`) -> `KeptAsStored`:
    not inverted, the tensor converts as stored and transformers drops the rows again when it loads the result;
  - `PrefixChange` is dropped, as transformers drops it when it saves a model it did not load (not a bijection);
  - parameters of a fused-experts module that no converter produces are `expert_tensors` (disk equals model).
  Anything else (custom ops, one-to-many splits, regex patterns that are not plain key paths) raises
  `Untranslatable` with the reason; `get_mapping` then refuses the type with that one line.
- Every group's fused key must name a parameter of the built model: a translation that does not fit the model it
  came from is refused rather than guessed.
The translation of single declarations lives in `transformers_translate`; this module builds the model of a type and
assembles its `MoEMapping`. Hand-written families (`convert/families/`) take precedence: they exist where transformers is wrong or where our
layout needs more (declared hub layouts, quantized companions, multi-stack E).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from .mapping import ExpertGroup, KeptAsStored, Layout, MoEMapping
from .transformers_translate import (  # noqa: F401 - fused_expert_types, is_fused_experts, language_model_types: public here
    _INDEX,
    RefusedKeys,
    TransformersRename,
    TransformersRenames,
    Untranslatable,
    _infix,
    _scoped,
    _shape_of_key,
    _template,
    _transformers,
    fused_expert_types,
    groups_of,
    is_fused_experts,
    kept_as_stored,
    language_model_types,
    quantized_companions,
)

FAMILY = "transformers"
NO_EXPERTS = "no fused expert parameter in the built model"


def _fewer_layers(cfg_dict: dict, k: int) -> dict:
    """The same configuration with its first `k` layers (every per-layer list cut to `k` entries)."""
    n = cfg_dict.get("num_hidden_layers")
    out = {key: (v[:k] if isinstance(v, list) and len(v) == n else v) for key, v in cfg_dict.items()}
    out["num_hidden_layers"] = k
    for key, v in cfg_dict.items():
        if isinstance(v, dict) and isinstance(v.get("num_hidden_layers"), int):  # sub-configs (text_config)
            out[key] = _fewer_layers(v, k)
    return out


# Config values that transformers' default config of a type leaves off or unset, without which its class builds no
# experts (gemma4: the MoE block is off by default), cannot be built at all (diffusion_gemma: `num_experts=None`;
# deepseek_ocr2: `mlp_layer_types=None` is indexed per layer), or lacks a kind of layer that transformers declares
# conversions for (inkling_mm_model: every layer is sparse by default, the dense MLP's `w13_dn` is converted too).
# Only the key patterns of the built model are read, never its sizes, so any valid values do; a real checkpoint's
# config.json carries its own. A callable value gets the (sub-)config dict.
_MOE_ON = dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=128)


def _first_dense(cfg: dict) -> list[str]:
    return ["dense"] + ["sparse"] * (cfg["num_hidden_layers"] - 1)


BUILD_CONFIG: dict[str, dict[str, Any]] = {
    "gemma4_text": _MOE_ON,
    "gemma4": {"text_config": _MOE_ON},
    "diffusion_gemma": {"text_config": {k: v for k, v in _MOE_ON.items() if k != "enable_moe_block"}},
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": _first_dense}},
    "inkling_mm_model": {"text_config": {"mlp_layer_types": _first_dense}},
}


def _with_build_config(tf: Any, model_type: str) -> Any:
    """The type's default config with its `BUILD_CONFIG` values (sub-config dicts merged into the defaults)."""
    extra = BUILD_CONFIG.get(model_type)
    default = tf.AutoConfig.for_model(model_type)
    if not extra:
        return default

    def merged(base: dict, values: dict) -> dict:
        out = dict(base)
        for key, value in values.items():
            if isinstance(value, dict):
                out[key] = merged(out.get(key) or {}, value)
            else:
                out[key] = value(base) if callable(value) else value
        return out

    return tf.AutoConfig.for_model(model_type, **merged(_kwargs(default), extra))


def _build_meta_model(model_type: str) -> Any:
    """transformers' own class on the meta device, from its default config (plus `BUILD_CONFIG`); when that config
    cannot be built (some defaults leave fields of later layer kinds unset), from its first 1, 2 or 4 layers. The
    transforms are key patterns: they do not depend on sizes or depth."""
    tf = _transformers()
    import torch

    cls_name = fused_expert_types().get(model_type)
    if cls_name is None:
        raise Untranslatable("transformers maps no model class to it")
    cls = getattr(tf, cls_name)
    default = _with_build_config(tf, model_type)
    configs = [lambda: default] + [
        lambda k=k: tf.AutoConfig.for_model(model_type, **_fewer_layers(_kwargs(default), k)) for k in (1, 2, 4)
    ]
    error: Exception | None = None
    for make in configs:
        try:
            with torch.device("meta"):
                model = cls._from_config(make())
        except Exception as e:
            error = error or e
            continue
        if any(is_fused_experts(m) for m in model.modules()) or error is None:
            return model
    raise Untranslatable(f"transformers cannot build {cls_name} from its default config ({type(error).__name__})")


def _kwargs(cfg: Any) -> dict:
    d = cfg.to_dict()
    d.pop("model_type", None)
    return d


def _expert_param_templates(model: Any) -> list[str]:
    """Templates of the parameters of fused-experts modules (layer index -> `{layer}`)."""
    out: list[str] = []
    for mod_name, mod in model.named_modules():
        if not is_fused_experts(mod):
            continue
        for p_name, _ in mod.named_parameters(recurse=False):
            t = re.sub(r"^(.*?)\blayers\.\d+\.", r"{prefix}layers.{layer}.", f"{mod_name}.{p_name}")
            if t not in out and "{layer}" in t:
                out.append(t)
    return out


def _check_groups(groups: list[ExpertGroup], model: Any) -> None:
    params = [n for n, _ in model.named_parameters()]
    for g in groups:
        targets = g.part_templates if g.unfused_in_model else (g.fused_template,)
        for t in targets:
            if not any(t.match(n) for n in params):
                raise Untranslatable(f"converter target {t.text!r} names no parameter of the model")


@dataclass
class _Translation:
    """What `_translate` collects from transformers' declarations of one model."""

    keys: list[str]
    renames: list = field(default_factory=list)
    groups: list[ExpertGroup] = field(default_factory=list)
    refused: list[RefusedKeys] = field(default_factory=list)
    kept: list[KeptAsStored] = field(default_factory=list)
    untranslatable: list[str] = field(default_factory=list)  # every reason, not just the first
    unscoped_of: dict[ExpertGroup, ExpertGroup] = field(default_factory=dict)  # scoped group -> before scoping
    plain: set[ExpertGroup] = field(default_factory=set)  # groups of unscoped converters

    def converter(self, t: Any, model_type: str) -> None:
        kept = kept_as_stored(t)
        if kept is not None:
            if kept not in self.kept:  # a sub-model's declarations repeat it
                self.kept.append(kept)
            return
        try:
            pairs = [(g, h) for grp in groups_of(t, model_type) for g in _infix(grp, self.keys) for h in _scoped(g, t, self.keys)]
        except Untranslatable as e:
            reverse = t.reverse_transform()
            if any(reverse._scoped_match(k) is not None for k in self.keys):
                if str(e) not in self.untranslatable:  # the built model uses it: the type is refused
                    self.untranslatable.append(str(e))
            else:
                self.refused.append(RefusedKeys(t, tuple(t._original_source_patterns), str(e)))
            return
        companions = quantized_companions(t)
        if companions is not None and companions not in self.refused:
            self.refused.append(companions)
        if t.scope_prefix:
            self.unscoped_of.update({h: g for g, h in pairs})
        else:
            self.plain.update(g for g, _ in pairs)
        for _, g in pairs:
            clash = [h for h in self.groups if h.fused == g.fused and h != g]
            if clash:
                raise Untranslatable(f"two converters produce {g.fused!r} from {clash[0].parts} and {g.parts}")
            if g not in self.groups:  # the same converter declared twice
                self.groups.append(g)

    def ordered_groups(self) -> list[ExpertGroup]:
        """A scoped converter that an unscoped one repeats (glm5_next declares its text converters for the root and
        the language model) adds nothing; the others are matched before the unscoped groups, whose `{prefix}` would
        also take their keys."""
        scoped = [g for g in self.groups if g in self.unscoped_of and self.unscoped_of[g] not in self.plain]
        return scoped + [g for g in self.groups if g not in self.unscoped_of]


def _translate(model: Any, model_type: str) -> _Translation:
    from transformers.conversion_mapping import get_model_conversion_mapping

    out = _Translation(list(model.state_dict()))
    for t in get_model_conversion_mapping(model, add_legacy=False):
        kind = type(t).__name__
        if kind == "PrefixChange":
            continue
        if kind in ("WeightRenaming", "Inkling2IndexOffsetWeightRename"):
            args = (t._original_source_patterns, t._original_target_patterns)
            out.renames.append(
                TransformersRename(*map(tuple, args), t.scope_prefix, t.base_model_prefix, getattr(t, "offset", None))
            )
        elif kind == "WeightConverter":
            out.converter(t, model_type)
        else:
            out.untranslatable.append(f"transformers' {kind} has no exact inverse here")
    if out.untranslatable:
        raise Untranslatable("; and ".join(out.untranslatable))
    return out


@cache
def generic_mapping(model_type: str) -> MoEMapping:
    """The translated mapping of `model_type`; raises `Untranslatable` with the reason."""
    if model_type not in fused_expert_types():
        raise Untranslatable("transformers declares no fused experts for it")
    model = _build_meta_model(model_type)
    tr = _translate(model, model_type)
    groups, renames = tr.ordered_groups(), tr.renames
    _check_groups(groups, model)
    model_keys = frozenset(_shape_of_key(k) for k in model.state_dict())
    stacked = [g for g in groups if g.stacked]
    expert_tensors = tuple(
        t for t in _expert_param_templates(model) if not any(g.fused_template.text == t for g in stacked)
    )
    if not stacked and not expert_tensors:
        raise Untranslatable(NO_EXPERTS)
    text_field = "text_config" if getattr(model.config, "text_config", None) is not None else None
    first = stacked[0].fused if stacked else expert_tensors[0]
    prefix = _prefix_of(model, first)
    return MoEMapping(
        model_type=model_type,
        family=FAMILY,
        groups=tuple(groups),
        renames=((TransformersRenames(tuple(renames), model_keys),) if renames else ()) + tuple(tr.refused),
        disk_layout=Layout.PER_EXPERT if stacked else Layout.FUSED,
        expert_tensors=expert_tensors,
        num_experts_fields=_num_experts_fields(model) if any(g.expert_block is not None for g in groups) else (),
        intermediate_fields=_intermediate_fields(model),
        text_config_field=text_field,
        notes=f"translated from transformers {_transformers().__version__} conversion_mapping ({type(model).__name__})"
        + "".join(f"; {k.key.removeprefix('{prefix}')} kept as stored ({k.reason})" for k in tr.kept),
        kept_as_stored=tuple(tr.kept),
        extra={
            "prefix": prefix,
            # transformers' patterns are unanchored, so `{prefix}` may stand for a different path in a non-expert
            # group (ernie's `mlp.gate.weight_1` vs its experts under `mlp.`): the catalog shows each with its own
            "group_prefixes": {
                g.fused: _prefix_of(model, g.parts[0] if g.unfused_in_model else g.fused) for g in groups if not g.stacked
            },
            "config": "-",
            "fused": _fused_text(model, expert_tensors),
            "transformers": _transformers().__version__,
        },
    )


def _num_experts_fields(model: Any) -> tuple[str, ...]:
    """The config field giving E when one on-disk expert list holds several stacks (`expert_block` groups): the field
    behind the `num_experts` attribute of the (text) config (`attribute_map`, e.g. ernie's `moe_num_experts`), which
    must equal every fused stack's expert count in the built model; else the type is refused."""
    cfg = model.config.get_text_config()
    name = type(cfg).attribute_map.get("num_experts", "num_experts")
    e = cfg.to_dict().get(name)
    stacks = {p.shape[0] for m in model.modules() if is_fused_experts(m) for p in m.parameters(recurse=False) if p.dim() == 3}
    if not isinstance(e, int) or stacks != {e}:
        raise Untranslatable(f"one on-disk expert list holds several stacks, but the config's {name} ({e!r}) is not their expert count {sorted(stacks)}")
    return (name,)


def _intermediate_fields(model: Any) -> tuple[str, ...]:
    """The config field(s) giving the experts' I: those equal to a non-transposed `down_proj [E, H, I]`'s last dim in
    the built model, MoE-named first. Used only to check a fused checkpoint's orientation against its shapes."""
    dims = {
        p.shape[-1]
        for m in model.modules()
        if hasattr(m, "is_transposed") and not m.is_transposed  # declared orientation only
        for n, p in m.named_parameters(recurse=False)
        if n == "down_proj" and p.dim() == 3
    }
    if len(dims) != 1:
        return ()
    (i,) = dims
    cfg = model.config
    sources = [cfg.to_dict()] + [sub.to_dict() for sub in (getattr(cfg, "text_config", None),) if sub is not None]
    names = {
        k for src in sources for k, v in src.items() if v == i and type(v) is int and "size" in k and k != "hidden_size"
    }
    return tuple(sorted(names, key=lambda k: ("moe" not in k and "expert" not in k, k)))


def _prefix_of(model: Any, template: str) -> str:
    """The `{prefix}` of the model's first key matching `template`, with layer index 7 (the catalog's example); for a
    scoped template (`{prefix}language_model.layers.{layer}...`) the key's path before its layers, which the catalog
    shows as where the layers live (its example keys are cut at `layers.7.`)."""
    from .mapping import Template

    for n, _ in model.named_parameters():
        caps = Template(template).match(n)
        if caps is not None and "{layer}" in template:
            return n[: re.search(r"\b(?:layers|blocks)\.\d+\.", n).start()]
        if caps is not None:
            return _INDEX.sub(".7", caps.get("prefix", ""))
    return "model."


def _fused_text(model: Any, expert_tensors: tuple[str, ...]) -> str:
    shapes = {}
    for n, p in model.named_parameters():
        for t in expert_tensors:
            if re.sub(r"\blayers\.\d+\.", "layers.{layer}.", n).endswith(t.split("{layer}.")[-1]):
                shapes.setdefault(t.split("{layer}.")[-1], list(p.shape))
    return ", ".join(f"{k} {v}" for k, v in shapes.items()) or "unchanged"


@cache  # refusals too: `generic_mapping`'s cache keeps results only
def try_generic_mapping(model_type: str) -> tuple[MoEMapping | None, str]:
    """`(mapping, "")`, or `(None, reason)` when the type cannot be translated."""
    try:
        return generic_mapping(model_type), ""
    except Untranslatable as e:
        return None, str(e)
