"""Registry of model-type records (`spec.ModelSpec`), keyed by HF `model_type` (aliases allowed).

Contract:
- `register(*records)`: called by the modules of `convert/families/` (every one is imported, by pkgutil: the one
  discovery of model types, for conversion and the zoo alike). A bare `MoEMapping` is a conversion-only record.
- `specs()`: the hand-written records by name (aliases included), sorted. `declared_spec(model_type)`: one of them
  or None; the zoo (`models`), expert parallelism (`parallel`) and `train` read their facts here.
- `get_spec(model_type)`: the hand-written record of the type when one is registered, else a record holding the
  mapping translated from the installed transformers' own conversion mapping (`transformers_mapping`), else raises
  `ConvertError` (one line: why transformers' declaration cannot be translated, or that the type is unknown).
  `get_mapping(model_type)` is its mapping: the lookup of `merge`, `split`, `verify`, `inspect` and the loaders.
- `all_specs()`: `specs()` plus a record for each translatable transformers type with fused experts: the single
  source of `automodel-convert list` and docs/MODELS.md. `registry()` / `all_mappings()`: the mappings of
  `specs()` / `all_specs()`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .errors import ConvertError
from .mapping import MoEMapping
from .spec import ModelSpec

_SPECS: dict[str, ModelSpec] = {}
_LOADED = False


def register(*records: ModelSpec | MoEMapping) -> None:
    for r in records:
        spec = r if isinstance(r, ModelSpec) else ModelSpec(mapping=r)
        for name in spec.names:
            if name in _SPECS and _SPECS[name] is not spec:
                raise ValueError(f"model type {name!r} registered twice")
            _SPECS[name] = spec


def _load_families() -> None:
    global _LOADED
    if _LOADED:
        return
    from . import families

    for info in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{info.name}")
    _LOADED = True


def specs() -> dict[str, ModelSpec]:
    """All hand-written records by model type (aliases included), sorted by name."""
    _load_families()
    return dict(sorted(_SPECS.items()))


def declared_spec(model_type: str) -> ModelSpec | None:
    """The hand-written record of `model_type`, or None (no translation from transformers is attempted)."""
    _load_families()
    return _SPECS.get(model_type)


def registry() -> dict[str, MoEMapping]:
    """All registered mappings by model type (aliases included), sorted by name."""
    return {name: s.mapping for name, s in specs().items()}


def all_specs() -> dict[str, ModelSpec]:
    """Hand-written records plus one per type translated from transformers (mapping only), by model type, sorted."""
    from .transformers_mapping import fused_expert_types, try_generic_mapping

    out = specs()
    for mt in fused_expert_types():
        if mt not in out:
            m, _ = try_generic_mapping(mt)
            if m is not None:
                out[mt] = ModelSpec(mapping=m)
    return dict(sorted(out.items()))


def all_mappings() -> dict[str, MoEMapping]:
    """The mappings of `all_specs()`: hand-written families plus every type translated from transformers."""
    return {name: s.mapping for name, s in all_specs().items()}


def get_spec(model_type: str) -> ModelSpec:
    spec = declared_spec(model_type)
    if spec is not None:
        return spec
    from .transformers_mapping import fused_expert_types, try_generic_mapping

    if model_type in fused_expert_types():
        m, why = try_generic_mapping(model_type)
        if m is not None:
            return ModelSpec(mapping=m)
        raise ConvertError(
            f"model_type {model_type!r}: transformers' conversion for it cannot be translated exactly ({why}); pass --model-type with a supported type if the checkpoint wraps one"
        )
    raise ConvertError(
        f"unknown model_type {model_type!r}; supported: {', '.join(specs())} and the types `automodel-convert list` shows. Pass --model-type with one of these if the checkpoint wraps a supported language model"
    )


def get_mapping(model_type: str) -> MoEMapping:
    return get_spec(model_type).mapping
