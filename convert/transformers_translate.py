"""transformers' declared load-time conversions translated into our reversible data (the half of the generic path
that does not assemble a mapping): which types declare fused experts (`fused_expert_types`, `is_fused_experts`,
`language_model_types`), renamings (`TransformersRename`, `TransformersRenames`, `RefusedKeys`), converters into
`ExpertGroup`s (`groups_of`: MergeModulelist/Concatenate/Transpose/Interleave/Chunk/Split, one expert list cut into
stacks, sub-model scopes), tensors kept as stored (`kept_as_stored`: a padding-row drop), with the ops
transformers needs that `convert.ops` lacks (`transformers_ops`: `RopePermute`, `ModelSizedConcat`). `Untranslatable` carries the
one-line reason a declaration has no exact inverse. `transformers_mapping` builds the model of a type and assembles
its `MoEMapping` from these pieces."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .mapping import ExpertGroup, KeptAsStored, tensor_fusion
from .ops import Concat, Deinterleave, Interleave, Op, Transpose
from .transformers_ops import MessageQueries, ModelSizedConcat, RopePermute, _transformers

_PLAIN = re.compile(r"^[A-Za-z0-9_.*]+$")

class Untranslatable(Exception):
    """transformers declares something this translation has no exact inverse for."""


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
    only: tuple[str, ...] = ()  # refuse only keys these source patterns match (a translated converter's extra sources)

    def to_model(self, key: str) -> str:
        from .errors import MappingError

        if self.only:
            if any(re.search(p, key) for p in self.only):
                raise MappingError(f"{key!r} cannot be converted exactly: {self.reason}")
        elif self.converter._scoped_match(key) is not None:
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
    if ops and _is(ops[0], "Inkling2LoopDequantizeExperts"):
        # transformers returns the weight as it is when its quantization companions are absent (unquantized
        # checkpoints, e.g. what it writes itself); checkpoints that hold them are refused (`quantized_companions`)
        sources, ops = sources[:1], ops[1:]
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
    if not ops and len(parts) == 1:  # a converter left with no operation: the tensor under its model name
        return tensor_fusion(fused, parts, ())
    if len(ops) == 1 and _is(ops[0], "Inkling2LoopMergeMessageQueries") and not ops[0].inverse and len(parts) == 2:
        return tensor_fusion(fused, parts, (MessageQueries(),))
    if len(ops) == 1 and _is(ops[0], "PermuteForRope") and len(parts) == 1:
        names = ops[0].permute_layer_names
        permute = names is None or any(n in sources[0] for n in names)
        return tensor_fusion(fused, parts, (_rope(ops[0], model_type),) if permute else ())
    if len(ops) == 1 and _is(ops[0], "Transpose") and not ops[0].check_dims and len(parts) == 1:
        return tensor_fusion(fused, parts, (Transpose(ops[0].dim0, ops[0].dim1),))
    raise Untranslatable(_why(sources, targets, ops))


def groups_of(conv: Any, model_type: str) -> list[ExpertGroup]:
    """One `WeightConverter` -> its `ExpertGroup`s: one (`_group`), or one per stack that transformers cuts one
    on-disk expert list into (`_expert_blocks`)."""
    ops = list(conv.operations)
    if len(ops) == 1 and _is(ops[0], "ErnieFuseAndSplitTextVisionExperts"):
        return _expert_blocks(conv, ops[0])
    return [_group(conv, model_type)]


def _expert_blocks(conv: Any, op: Any) -> list[ExpertGroup]:
    """transformers' `ErnieFuseAndSplitTextVisionExperts(stack_dim=0, concat_dim=d)`: each source part's on-disk
    expert list is cut into one run per target (text experts, then vision experts), each run stacked and the parts
    concatenated along d. Target k becomes a group of the k-th run of E on-disk experts (`expert_block=k`, E from the
    config; transformers cuts at ceil(N / targets), the same run when N = targets * E as the model's stacks need)."""
    sources, targets = conv._original_source_patterns, conv._original_target_patterns
    parts = tuple(_template(p) for p in sources)
    fused = [_template(t) for t in targets]
    if op.stack_dim != 0 or op.concat_dim < 1 or not all("{expert}" in p for p in parts) or any("{expert}" in f for f in fused):
        raise Untranslatable(f"{_why(sources, targets, [op])} has no exact translation")
    ops = (Concat(op.concat_dim - 1),) if len(parts) > 1 else ()
    fused_ops = None if ops == ((Concat(0),) if len(parts) > 1 else ()) else ops
    return [ExpertGroup(fused=f, parts=parts, fused_ops=fused_ops, expert_block=k) for k, f in enumerate(fused)]


# transformers' ops that drop a tensor's padding rows on load and pad zeros back on save (the key keeps its name):
# the config field giving the rows its model keeps
_KEPT_ROWS = {"Inkling2UnpadVocab": "unpadded_vocab_size"}


def kept_as_stored(conv: Any) -> KeptAsStored | None:
    """A converter that only drops padding rows of one tensor keeping its name (inkling2's `Inkling2UnpadVocab` on
    `lm_head.weight`), as a `KeptAsStored` declaration; None for any other converter."""
    ops = list(conv.operations)
    sources, targets = conv._original_source_patterns, conv._original_target_patterns
    if len(ops) != 1 or type(ops[0]).__name__ not in _KEPT_ROWS or getattr(ops[0], "inverse", False):
        return None
    if len(sources) != 1 or len(targets) != 1 or _template(sources[0]) != _template(targets[0]):
        return None
    name = type(ops[0]).__name__
    reason = f"transformers' {name} keeps the first {_KEPT_ROWS[name]} rows on load and pads zeros back on save"
    return KeptAsStored(_template(targets[0]), _KEPT_ROWS[name], reason)


# Why transformers' custom ops have no exact translation here (the refusal says it in one line).
_EXPLAIN = {
    "PermuteForRope": "a rotary permutation in a position not translated",
}


def quantized_companions(conv: Any) -> RefusedKeys | None:
    """transformers' `Inkling2LoopDequantizeExperts` reads a weight and, in quantized checkpoints, its NVFP4/MXFP8
    scales: the weight alone is translated (`_group`), and a checkpoint holding the scales is refused by this."""
    ops, sources = list(conv.operations), conv._original_source_patterns
    if not ops or not _is(ops[0], "Inkling2LoopDequantizeExperts") or len(sources) < 2:
        return None
    reason = ("transformers dequantizes these NVFP4/MXFP8 experts on load, which is not reversible bit for bit; "
              "there is nothing to merge: load the checkpoint as it is")
    return RefusedKeys(conv, tuple(sources), reason, only=tuple(sources[1:]))


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
