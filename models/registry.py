"""The zoo's model classes, read from the one record per model type (`convert.spec.ModelSpec.zoo`).

Contract: `get_model_class(model_type)` imports and returns the class the type's record names, or None (no record,
or a conversion-only record: the caller then falls back to transformers' own class with our experts
implementation, see hf_experts.py). `zoo_types()` lists the types whose record names a zoo class; `VERIFIED` is that
tuple: every zoo class's parity with transformers is tested (tests/test_models_parity.py). Nothing is registered
here: adding a zoo class is naming it in its type's record (`convert/families/<family>.py`).
"""

from __future__ import annotations

from functools import cache
from importlib import import_module

from ..convert.registry import declared_spec, specs


def zoo_types() -> tuple[str, ...]:
    """Model types whose record names a zoo class, sorted."""
    return tuple(name for name, spec in specs().items() if spec.zoo)


@cache
def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(import_module(module), name)


def get_model_class(model_type: str) -> type | None:
    spec = declared_spec(model_type)
    return None if spec is None or spec.zoo is None else _import_class(spec.zoo)


VERIFIED = zoo_types()
