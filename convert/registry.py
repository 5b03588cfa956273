"""Registry of model-type mappings, keyed by HF `model_type` (aliases allowed).

Contract: `get_mapping(model_type)` returns the `MoEMapping` or raises `ConvertError` listing the supported types.
Families register themselves in `convert/families/*.py`; adding a model type is one small data entry there.
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


def get_mapping(model_type: str) -> MoEMapping:
    reg = registry()
    if model_type not in reg:
        raise ConvertError(
            f"unknown model_type {model_type!r}; supported: {', '.join(reg)}. Pass --model-type with one of these if the checkpoint wraps a supported language model"
        )
    return reg[model_type]
