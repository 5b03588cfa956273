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
  - `PrefixChange` is dropped, as transformers drops it when it saves a model it did not load (not a bijection);
  - parameters of a fused-experts module that no converter produces are `expert_tensors` (disk equals model).
  Anything else (custom ops, one-to-many splits, regex patterns that are not plain key paths) raises
  `Untranslatable` with the reason; `get_mapping` then refuses the type with that one line.
- Every group's fused key must name a parameter of the built model: a translation that does not fit the model it
  came from is refused rather than guessed.
Hand-written families (`convert/families/`) take precedence: they exist where transformers is wrong or where our
layout needs more (declared hub layouts, quantized companions, multi-stack E).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .mapping import ExpertGroup, Layout, MoEMapping, tensor_fusion
from .ops import Concat, Deinterleave, Interleave, Op, Transpose

FAMILY = "transformers"
NO_EXPERTS = "no fused expert parameter in the built model"
_PLAIN = re.compile(r"^[A-Za-z0-9_.*]+$")


class Untranslatable(Exception):
    """transformers declares something this translation has no exact inverse for."""


def _transformers() -> Any:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    return transformers


_EXPERTS_CLASS = re.compile(r"class \w+Experts\(nn\.Module\):")
_STACKED_PARAM = re.compile(r"nn\.Parameter\(\s*torch\.\w+\(\s*[\w.]*experts\b")


def _declares_fused_experts(source: str) -> bool:
    """A modeling file with transformers' experts decorator, or an `...Experts` module with stacked parameters."""
    return "use_experts_implementation" in source or bool(
        _EXPERTS_CLASS.search(source) and _STACKED_PARAM.search(source)
    )


def is_fused_experts(module: Any) -> bool:
    """A module holding fused experts: decorated by transformers, or an `...Experts` class with 3-D parameters."""
    if hasattr(module, "is_concatenated"):
        return True
    own = [p for _, p in module.named_parameters(recurse=False)]
    return type(module).__name__.endswith("Experts") and any(p.dim() == 3 for p in own)


@cache
def language_model_types() -> frozenset[str]:
    """Model types transformers builds a causal or image-text-to-text language model for (not towers)."""
    _transformers()
    from transformers.models.auto import modeling_auto as ma

    return frozenset(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | frozenset(ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


@cache
def fused_expert_types() -> dict[str, str | None]:
    """Model type -> class name (None: transformers maps no model class to it), for types with fused experts."""
    tf = _transformers()
    from transformers.models.auto import configuration_auto as ca
    from transformers.models.auto import modeling_auto as ma

    root = Path(tf.__file__).parent / "models"
    tables = (
        ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        ma.MODEL_MAPPING_NAMES,
    )
    out: dict[str, str | None] = {}
    for mt in sorted(ca.CONFIG_MAPPING_NAMES):
        mod = ca.model_type_to_module_name(mt)
        path = root / mod / f"modeling_{mod}.py"
        if path.exists() and _declares_fused_experts(path.read_text()):
            out[mt] = next((t[mt] for t in tables if mt in t), None)
    return out


@dataclass(frozen=True)
class TransformersRename:
    """One transformers `WeightRenaming` (or its index-shifting `Inkling2IndexOffsetWeightRename`: `offset`), as the
    keyword arguments that rebuild it plus its scope."""

    source_patterns: tuple[str, ...]
    target_patterns: tuple[str, ...]
    scope_prefix: str | None = None
    base_model_prefix: str | None = None
    offset: int | None = None
    _objs: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def _pair(self) -> tuple[Any, Any]:
        if not self._objs:
            from transformers import core_model_loading as cml

            args = (list(self.source_patterns), list(self.target_patterns))
            fwd = cml.WeightRenaming(*args) if self.offset is None else cml.Inkling2IndexOffsetWeightRename(*args, self.offset)
            fwd.scope_prefix, fwd.base_model_prefix = self.scope_prefix, self.base_model_prefix
            self._objs.extend((fwd, fwd.reverse_transform()))
        return self._objs[0], self._objs[1]

    def to_model(self, key: str) -> str:
        return self._pair()[0].rename_source_key(key)[0]

    def to_disk(self, key: str) -> str:
        return self._pair()[1].rename_source_key(key)[0]


@dataclass(frozen=True)
class RefusedKeys:
    """A transformers converter with no exact translation whose targets the model built from the type's default
    config does not have (a kind of layer that config leaves off, e.g. qwen4_exp's sharded n-gram embedding): the type
    is translated, and a checkpoint that has the converter's source keys is refused with `reason` when its keys are
    renamed (after transformers' renamings, where transformers applies its converters)."""

    converter: Any = field(compare=False, hash=False, repr=False)
    sources: tuple[str, ...] = ()
    reason: str = ""

    def to_model(self, key: str) -> str:
        if self.converter._scoped_match(key) is not None:
            from .errors import MappingError

            raise MappingError(
                f"{key!r} cannot be converted exactly: {self.reason} (a layer kind the type's default config leaves off)"
            )
        return key

    def to_disk(self, key: str) -> str:
        return key


_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _shape_of_key(key: str) -> str:
    """`model.layers.3.mlp.gate.weight` -> `model.layers.#.mlp.gate.weight` (any index)."""
    return _INDEX.sub(".#", key)


@dataclass(frozen=True)
class TransformersRenames:
    """transformers' renamings of one model, applied in order to disk keys; a key that already is one of the model's
    own names is left alone (the planner renames model-named checkpoints too, and transformers' patterns are not
    idempotent: `mlp.shared_expert.` also matches `mlp.shared_experts.`). A disk key whose renaming does not come
    back to it exactly is refused."""

    renames: tuple[TransformersRename, ...]
    model_keys: frozenset[str]  # `_shape_of_key` of every state-dict key of the model

    def to_model(self, key: str) -> str:
        if _shape_of_key(key) in self.model_keys:
            return key
        out = key
        for r in self.renames:
            out = r.to_model(out)
        if out != key and self.to_disk(out) != key:
            from .errors import MappingError

            raise MappingError(
                f"key {key!r} renames to {out!r}, which transformers' reverse renaming does not take back to {key!r}"
            )
        return out

    def to_disk(self, key: str) -> str:
        for r in reversed(self.renames):
            key = r.to_disk(key)
        return key


def _template(pattern: str) -> str:
    """transformers' source/target pattern (a key path, `*` = expert index) -> our template with `{prefix}`."""
    text = pattern.replace("\\.", ".").lstrip("^").lstrip(".")
    if not _PLAIN.match(text) or "**" in text:
        raise Untranslatable(f"pattern {pattern!r} is not a plain key path")
    return "{prefix}" + text.replace("*", "{expert}")


def _expert_ops(ops: list) -> tuple[Op, ...]:
    """Ops after `MergeModulelist(0)` (on the stack) -> ops on one expert's list of parts."""
    out: list[Op] = []
    for op in ops:
        name = type(op).__name__
        if name == "Concatenate" and op.dim >= 1 and op.num_shards_attribute is None:
            out.append(Concat(op.dim - 1))
        elif name == "Transpose" and min(op.dim0, op.dim1) >= 1 and not op.check_dims:
            out.append(Transpose(op.dim0 - 1, op.dim1 - 1))
        else:
            raise Untranslatable(f"operation {op!r} after MergeModulelist has no exact translation")
    return tuple(out)


def _is(op: Any, name: str) -> bool:
    return type(op).__name__ == name


def _group(conv: Any, model_type: str) -> ExpertGroup:
    """One `WeightConverter` -> one `ExpertGroup`: stacked with MergeModulelist(0); else a non-stacked fusion (a
    concat or transformers' de-interleave of one tensor), or, for a one-to-many `Chunk`, a non-stacked fusion whose
    parts are the model's (`unfused_in_model`)."""
    ops = list(conv.operations)
    sources, targets = conv._original_source_patterns, conv._original_target_patterns
    if len(targets) != 1:
        return _one_to_many(conv, ops, sources, targets, model_type)
    parts = tuple(_template(p) for p in sources)
    fused = _template(targets[0])
    if ops and _is(ops[0], "MergeModulelist") and ops[0].dim == 0:
        if not all("{expert}" in p for p in parts) or "{expert}" in fused:
            raise Untranslatable(f"converter {sources} merges modules without an expert index")
        fused_ops = _expert_ops(ops[1:])
        default = (Concat(0),) if len(parts) > 1 else ()
        return ExpertGroup(fused=fused, parts=parts, fused_ops=None if fused_ops == default else fused_ops)
    if any("{expert}" in p for p in parts + (fused,)):
        raise Untranslatable(
            f"transformers' converter {sources} -> {targets} with {ops!r} joins the keys of every index into one tensor without stacking them: their number is not in its shape"
        )
    if len(ops) == 1 and _is(ops[0], "Concatenate") and ops[0].num_shards_attribute is None:
        return tensor_fusion(fused, parts, (Concat(ops[0].dim),))
    if len(ops) == 1 and _is(ops[0], "Interleave") and not ops[0].inverse and len(parts) == 1:
        # transformers' Interleave(d) reads [g0, u0, g1, u1, ...] along d and holds [g..., u...]
        return tensor_fusion(fused, parts, (Deinterleave(ops[0].dim), Concat(ops[0].dim)))
    if len(ops) == 1 and _is(ops[0], "PermuteForRope") and len(parts) == 1:
        names = ops[0].permute_layer_names
        permute = names is None or any(n in sources[0] for n in names)
        return tensor_fusion(fused, parts, (_rope(ops[0], model_type),) if permute else ())
    if len(ops) == 1 and _is(ops[0], "Transpose") and not ops[0].check_dims and len(parts) == 1:
        return tensor_fusion(fused, parts, (Transpose(ops[0].dim0, ops[0].dim1),))
    raise Untranslatable(_why(sources, targets, ops))


# Why transformers' custom ops have no exact translation here (the refusal says it in one line).
_EXPLAIN = {
    "ErnieFuseAndSplitTextVisionExperts": "one on-disk expert list holds the text experts, then the vision experts, "
    "and transformers splits it into two fused stacks: a group here cannot start its experts at an index offset",
    "Inkling2UnpadVocab": "transformers drops the unembedding's padding rows on load and writes zeros back on save: "
    "not a bijection (non-zero padding is lost), it changes the element count (ops here only move elements), and "
    "the key keeps its name",
    "Inkling2LoopMergeMessageQueries": "a custom interleaving of two tensors into one (no translated op)",
    "Inkling2LoopDequantizeExperts": "NVFP4/MXFP8 experts dequantized on load: not reversible bit for bit",
    "PermuteForRope": "a rotary permutation in a position not translated",
}


def _why(sources: list, targets: list, ops: list) -> str:
    custom = [_EXPLAIN[type(op).__name__] for op in ops if type(op).__name__ in _EXPLAIN]
    text = f"transformers' converter {sources} -> {targets} with {ops!r}"
    return f"{text}: {'; '.join(custom)}" if custom else f"{text} has no exact translation"


def _one_to_many(conv: Any, ops: list, sources: list, targets: list, model_type: str) -> ExpertGroup:
    """transformers' one-to-many `Chunk(d)` (equal parts), then optionally `PermuteForRope` (of the parts it names),
    `Interleave(d), Chunk(d)` (even and odd rows), or `Split(d)` (parts sized like the model's parameters, read from
    the model transformers builds from the checkpoint's config): the disk holds one tensor, the model its parts."""
    if len(sources) != 1 or any(type(op).__name__ in _EXPLAIN and not _is(op, "PermuteForRope") for op in ops):
        raise Untranslatable(_why(sources, targets, ops))
    parts = tuple(_template(t) for t in targets)
    fused = _template(sources[0])
    if any("{expert}" in p for p in parts + (fused,)):
        raise Untranslatable(f"{_why(sources, targets, ops)}: it splits one key per expert index into several")
    if len(ops) == 2 and _is(ops[0], "Chunk") and _is(ops[1], "PermuteForRope"):
        names = ops[1].permute_layer_names
        select = tuple(i for i, t in enumerate(targets) if names is None or any(n in t for n in names))
        rope = (dataclasses.replace(_rope(ops[1], model_type).inverse(), select=select),)
        ops = ops[:1]
    else:
        rope = ()
    last = ops[-1] if ops else None
    if len(ops) == 1 and _is(last, "Split"):  # parts sized like the model's parameters: bound from the config
        return tensor_fusion(fused, parts, (ModelSizedConcat(model_type, tuple(targets), last.dim),), unfused_in_model=True)
    if last is None or not _is(last, "Chunk") or last.num_shards_attribute is not None:
        raise Untranslatable(_why(sources, targets, ops))
    d = last.dim
    if len(ops) == 1:  # parts -> disk: the permutation undone, then the concat
        return tensor_fusion(fused, parts, rope + (Concat(d),), unfused_in_model=True)
    if len(ops) == 2 and _is(ops[0], "Interleave") and not ops[0].inverse and ops[0].dim == d and len(parts) == 2:
        return tensor_fusion(fused, parts, (Interleave(d),), unfused_in_model=True)
    raise Untranslatable(_why(sources, targets, ops))


def _rope(op: Any, model_type: str) -> RopePermute:
    """transformers' `PermuteForRope` in its load direction (disk -> model)."""
    return RopePermute(model_type, op.subconfig_key, interleave=bool(op.inverse))


@dataclass(frozen=True)
class RopePermute(Op):
    """transformers' `PermuteForRope`: in each of `heads` row blocks of dim 0 (one head), the interleaved rotary pairs
    `[x0, y0, x1, y1, ...]` become halves `[x0, x1, ..., y0, y1, ...]` (`interleave=False`, transformers' load
    direction) or back (`interleave=True`). `heads` is `num_attention_heads` of the config's `sub_config` (1 when
    absent, as transformers reads it), bound from the checkpoint's config.json (`bind_config`, called by the planner
    through `MoEMapping.for_config`); `select`: the list positions it permutes (None: all). 1-D and 2-D tensors only,
    as transformers; it only moves elements (bit-exact)."""

    model_type: str
    sub_config: str | None
    interleave: bool = False
    select: tuple[int, ...] | None = None
    heads: int | None = None

    def bind_config(self, config: dict) -> RopePermute:
        return dataclasses.replace(self, heads=_config_heads(self.model_type, self.sub_config, config))

    def _applies(self, i: int, shape: tuple) -> bool:
        return (self.select is None or i in self.select) and len(shape) in (1, 2)

    def apply(self, xs: Any) -> list:
        if self.heads is None:
            raise ValueError("RopePermute needs the config's head count: bind_config(config) first")
        out = []
        for i, x in enumerate(xs):
            if self._applies(i, tuple(x.shape)):
                half = x.shape[0] // self.heads // 2
                pair = (2, half) if self.interleave else (half, 2)
                x = x.reshape(self.heads, *pair, *x.shape[1:]).transpose(1, 2).reshape(x.shape).contiguous()
            out.append(x)
        return out

    def inverse(self) -> RopePermute:
        return dataclasses.replace(self, interleave=not self.interleave)

    def out_shapes(self, shapes: Any) -> list:
        for i, sh in enumerate(shapes):
            if self.heads is not None and self._applies(i, tuple(sh)) and sh[0] % (2 * self.heads):
                raise ValueError(f"dim 0 of {list(sh)} is not {self.heads} heads of rotary pairs")
        return [tuple(sh) for sh in shapes]


@dataclass(frozen=True)
class ModelSizedConcat(Concat):
    """The inverse of transformers' `Split(dim)`: parts sized like the model's parameters named by `targets` (key
    infixes), which the model built from the checkpoint's config (meta device) gives (`bind_config` -> a `Concat`
    with those sizes; a fused tensor of another total is refused)."""

    model_type: str = ""
    targets: tuple[str, ...] = ()

    def __init__(self, model_type: str, targets: tuple[str, ...], dim: int) -> None:
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "sizes", None)
        object.__setattr__(self, "model_type", model_type)
        object.__setattr__(self, "targets", targets)

    def bind(self, shapes: Any) -> Concat:
        return Concat(self.dim).bind(shapes)

    def bind_config(self, config: dict) -> Concat:
        shapes = _config_model(self.model_type, json.dumps(config, sort_keys=True))
        sizes = []
        for t in self.targets:
            hit = re.compile(re.escape(t.replace("\\.", ".")) + r"(?!\w)")
            name = next((n for n in shapes if hit.search(n)), None)
            if name is None:
                from .errors import MappingError

                raise MappingError(f"the {self.model_type} model of this config.json has no {t!r} parameter to size a split by")
            sizes.append(shapes[name][self.dim])
        return Concat(self.dim, tuple(sizes))


@cache
def _config_model(model_type: str, config_json: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of transformers' model of `model_type` built from a config.json (meta device)."""
    from .errors import MappingError

    tf = _transformers()
    import torch

    try:
        cfg = tf.CONFIG_MAPPING[model_type].from_dict(json.loads(config_json))
        with torch.device("meta"):
            model = getattr(tf, fused_expert_types()[model_type])._from_config(cfg)
    except Exception as e:
        raise MappingError(
            f"transformers cannot build {model_type} from config.json ({type(e).__name__}: {e}); its parameter shapes size a split"
        ) from e
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _config_heads(model_type: str, sub_config: str | None, config: dict) -> int:
    """`num_attention_heads` of the checkpoint's config (its `sub_config`), with transformers' defaults filled in: a
    config.json written by transformers leaves out values equal to the defaults."""
    from .errors import MappingError

    tf = _transformers()
    try:
        cfg = tf.CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as e:
        raise MappingError(
            f"cannot read config.json as a {model_type} config ({type(e).__name__}: {e}); its attention heads decide a rotary permutation"
        ) from e
    if sub_config is not None:
        cfg = getattr(cfg, sub_config, cfg)
    heads = getattr(cfg, "num_attention_heads", 1)
    if not isinstance(heads, int) or heads < 1:
        raise MappingError(f"config.json's {sub_config or model_type} num_attention_heads is {heads!r}; expected a positive integer")
    return heads


def _infix(g: ExpertGroup, model_keys: list[str]) -> list[ExpertGroup]:
    """A converter whose patterns are key infixes (`attention.wq.` -> `attention.q_proj.`, `linear_attn.in_proj` ->
    `linear_attn.in_proj_qkv|...`) becomes one group per tensor suffix the built model has after the model-side
    infix (`weight`, `.weight`, `bias`)."""
    model_tpl = g.parts[0] if g.unfused_in_model else g.fused
    model_side = model_tpl.removeprefix("{prefix}")
    if "{expert}" in model_tpl or any(k.endswith(model_side) for k in model_keys):
        return [g]  # the end of a key name already (transformers searches it, `attn.q_proj` in `self_attn.q_proj`)
    ends = re.compile(r"(?:^|(?<=\.))" + re.escape(model_side) + (r"" if model_side.endswith(".") else r"(?=\.)"))
    suffixes: list[str] = []
    for key in model_keys:
        m = ends.search(key)
        if m is not None and key[m.end() :] not in suffixes:
            suffixes.append(key[m.end() :])
    if not suffixes:
        raise Untranslatable(f"converter target {model_side!r} names no parameter of the model")
    return [
        dataclasses.replace(g, fused=g.fused + sfx, parts=tuple(p + sfx for p in g.parts)) for sfx in suffixes
    ]


_LAYER = re.compile(r"(?:^|(?<=\.))\d+(?=\.)")


def _scoped(g: ExpertGroup, conv: Any, model_keys: list[str]) -> list[ExpertGroup]:
    """A converter transformers scoped to a sub-model (`scope_prefix`, e.g. `vision_tower`) matches only keys under
    `[base_model_prefix.]scope.`: its group's templates get that scope and the path from it to the pattern in the
    built model (layer index -> `{layer}`; it may end inside a name, `self_` of `self_attn.`, as transformers searches
    the pattern), one group per such path; `{prefix}` before the scope takes `model.` or a wrapper's prefix. Two sub-models may then declare the same fused name (dots3_note: text and vision experts)."""
    scope = conv.scope_prefix
    if not scope:
        return [g]
    base = conv.base_model_prefix
    heads = [f"{base}.{scope}.", f"{scope}."] if base else [f"{scope}."]
    body = (g.parts[0] if g.unfused_in_model else g.fused).removeprefix("{prefix}")
    body_re = re.compile(re.escape(body).replace(re.escape("{expert}"), r"\d+") + r"\Z")
    mids: list[str] = []
    for key in model_keys:
        head = next((h for h in heads if key.startswith(h)), None)
        m = None if head is None else body_re.search(key, len(head))  # anywhere, as transformers searches
        if m is None:
            continue
        mid, n = _LAYER.subn("{layer}", key[len(head) : m.start()])
        if n > 1:
            raise Untranslatable(f"converter {conv._original_source_patterns} scoped to {scope!r} sits under two indices")
        if mid not in mids:
            mids.append(mid)
    if not mids:
        raise Untranslatable(f"converter target {body!r} scoped to {scope!r} names no parameter of the model")

    def under(t: str, mid: str) -> str:
        return f"{{prefix}}{scope}.{mid}{t.removeprefix('{prefix}')}"

    return [
        dataclasses.replace(g, fused=under(g.fused, mid), parts=tuple(under(p, mid) for p in g.parts)) for mid in mids
    ]


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


def _translate(model: Any, model_type: str) -> tuple[list, list, list[ExpertGroup]]:
    from transformers.conversion_mapping import get_model_conversion_mapping

    renames: list = []
    groups: list[ExpertGroup] = []
    refused: list[RefusedKeys] = []
    untranslatable: list[str] = []  # every reason, not just the first
    unscoped_of: dict[ExpertGroup, ExpertGroup] = {}  # scoped group -> the group before scoping
    plain: set[ExpertGroup] = set()  # groups of unscoped converters
    keys = list(model.state_dict())
    for t in get_model_conversion_mapping(model, add_legacy=False):
        kind = type(t).__name__
        if kind == "PrefixChange":
            continue
        if kind in ("WeightRenaming", "Inkling2IndexOffsetWeightRename"):
            r = TransformersRename(
                tuple(t._original_source_patterns),
                tuple(t._original_target_patterns),
                t.scope_prefix,
                t.base_model_prefix,
                getattr(t, "offset", None),
            )
            renames.append(r)
        elif kind == "WeightConverter":
            try:
                pairs = [(g, h) for g in _infix(_group(t, model_type), keys) for h in _scoped(g, t, keys)]
            except Untranslatable as e:
                reverse = t.reverse_transform()
                if any(reverse._scoped_match(k) is not None for k in keys):
                    if str(e) not in untranslatable:  # the built model uses it: the type is refused
                        untranslatable.append(str(e))
                else:
                    refused.append(RefusedKeys(t, tuple(t._original_source_patterns), str(e)))
                continue
            translated = [h for _, h in pairs]
            if t.scope_prefix:
                unscoped_of.update({h: g for g, h in pairs})
            else:
                plain.update(g for g, _ in pairs)
            for g in translated:
                clash = [h for h in groups if h.fused == g.fused and h != g]
                if clash:
                    raise Untranslatable(f"two converters produce {g.fused!r} from {clash[0].parts} and {g.parts}")
                if g not in groups:  # the same converter declared twice
                    groups.append(g)
        else:
            untranslatable.append(f"transformers' {kind} has no exact inverse here")
    if untranslatable:
        raise Untranslatable("; and ".join(untranslatable))
    # a scoped converter that an unscoped one repeats (glm5_next declares its text converters for the root and the
    # language model) adds nothing; the others are matched before the unscoped groups, whose `{prefix}` would also
    # take their keys
    scoped = [g for g in groups if g in unscoped_of and unscoped_of[g] not in plain]
    return renames, refused, scoped + [g for g in groups if g not in unscoped_of]


@cache
def generic_mapping(model_type: str) -> MoEMapping:
    """The translated mapping of `model_type`; raises `Untranslatable` with the reason."""
    if model_type not in fused_expert_types():
        raise Untranslatable("transformers declares no fused experts for it")
    model = _build_meta_model(model_type)
    renames, refused, groups = _translate(model, model_type)
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
        renames=((TransformersRenames(tuple(renames), model_keys),) if renames else ()) + tuple(refused),
        disk_layout=Layout.PER_EXPERT if stacked else Layout.FUSED,
        expert_tensors=expert_tensors,
        num_experts_fields=(),
        intermediate_fields=_intermediate_fields(model),
        text_config_field=text_field,
        notes=f"translated from transformers {_transformers().__version__} conversion_mapping ({type(model).__name__})",
        extra={
            "prefix": prefix,
            "config": "-",
            "fused": _fused_text(model, expert_tensors),
            "transformers": _transformers().__version__,
        },
    )


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
