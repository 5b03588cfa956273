"""Registry of model-type mappings, keyed by HF `model_type` (aliases allowed).

Contract: `get_mapping(model_type)` returns the hand-written `MoEMapping` of the type when one is registered, else
the one translated from the installed transformers' own conversion mapping (`transformers_mapping`), else raises
`ConvertError` (one line: why transformers' declaration cannot be translated, or that the type is unknown).
`registry()` holds the hand-written families (`convert/families/*.py`, one small data entry per type);
`all_mappings()` adds every translatable transformers type with fused experts: the single source of
`automodel-convert list` and docs/MODELS.md.
"""

from __future__ import annotations

import importlib
import pkgutil

from .errors import ConvertError
from .mapping import MoEMapping

_REGISTRY: dict[str, MoEMapping] = {}
_LOADED = False


def register(*mappings: MoEMapping) -> None:
    for m in mappings:
        for name in (m.model_type, *m.aliases):
            if name in _REGISTRY and _REGISTRY[name] is not m:
                raise ValueError(f"model type {name!r} registered twice")
            _REGISTRY[name] = m


def _load_families() -> None:
    global _LOADED
    if _LOADED:
        return
    from . import families

    for info in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{info.name}")
    _LOADED = True


def registry() -> dict[str, MoEMapping]:
    """All registered mappings by model type (aliases included), sorted by name."""
    _load_families()
    return dict(sorted(_REGISTRY.items()))


def all_mappings() -> dict[str, MoEMapping]:
    """Hand-written families plus every type translated from transformers, by model type, sorted."""
    from .transformers_mapping import fused_expert_types, try_generic_mapping

    out = dict(registry())
    for mt in fused_expert_types():
        if mt not in out:
            m, _ = try_generic_mapping(mt)
            if m is not None:
                out[mt] = m
    return dict(sorted(out.items()))


def get_mapping(model_type: str) -> MoEMapping:
    reg = registry()
    if model_type in reg:
        return reg[model_type]
    from .transformers_mapping import fused_expert_types, try_generic_mapping

    if model_type in fused_expert_types():
        m, why = try_generic_mapping(model_type)
        if m is not None:
            return m
        raise ConvertError(
            f"model_type {model_type!r}: transformers' conversion for it cannot be translated exactly ({why}); pass --model-type with a supported type if the checkpoint wraps one"
        )
    raise ConvertError(
        f"unknown model_type {model_type!r}; supported: {', '.join(reg)} and the types `automodel-convert list` shows. Pass --model-type with one of these if the checkpoint wraps a supported language model"
    )
