"""The ops transformers' declared conversions need that `convert.ops` lacks: `RopePermute` (transformers'
`PermuteForRope`, its head count from the config), `ModelSizedConcat` (the inverse of transformers' `Split`, sized
like the parameters of the model built from the config) and `MessageQueries` (transformers'
`Inkling2LoopMergeMessageQueries`). `transformers_translate` makes them from transformers' declarations; all only
move elements (bit-exact)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from .ops import Concat, Op


def _transformers() -> Any:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    return transformers


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
class MessageQueries(Op):
    """transformers' `Inkling2LoopMergeMessageQueries`: two `[2L, H]` tensors whose rows alternate (query, mlp) and
    (key, value) per loop layer -> one `[L, 4, H]` holding (query, key, value, mlp) per layer (`split=False`, the load
    direction), or back (`split=True`). It only moves rows (bit-exact)."""

    split: bool = False

    def apply(self, xs: Any) -> list:
        import torch

        if self.split:
            (x,) = xs
            return [x[:, [0, 3]].flatten(0, 1).contiguous(), x[:, 1:3].flatten(0, 1).contiguous()]
        a, b = (t.unflatten(0, (-1, 2)) for t in xs)
        return [torch.cat([a[:, :1], b, a[:, 1:]], dim=1)]

    def inverse(self) -> MessageQueries:
        return MessageQueries(split=not self.split)

    def out_shapes(self, shapes: Any) -> list:
        if self.split:
            (s,) = shapes
            if len(s) != 3 or s[1] != 4:
                raise ValueError(f"message queries {list(s)} are not [loop layers, 4, hidden]")
            return [(2 * s[0], s[2]), (2 * s[0], s[2])]
        a, b = (tuple(s) for s in shapes)
        if a != b or len(a) != 2 or a[0] % 2:
            raise ValueError(f"message queries {list(a)} and {list(b)} are not two [2 x loop layers, hidden] tensors")
        return [(a[0] // 2, 4, a[1])]


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
    import torch

    from .errors import MappingError
    from .transformers_translate import fused_expert_types

    tf = _transformers()

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
