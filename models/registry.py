"""Registry of the zoo's model classes keyed by transformers' `model_type`.

Contract: `@register("qwen3_moe")` on a `MoECausalLM` subclass adds it; `get_model_class(model_type)` returns it or
None (the caller then falls back to transformers' own class with our experts implementation, see hf_experts.py);
`VERIFIED` lists the types whose parity with transformers is tested (tests/test_models_parity.py).
"""

from __future__ import annotations

from collections.abc import Callable

MODEL_REGISTRY: dict[str, type] = {}
VERIFIED = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "glm4_moe", "dots1", "gpt_oss")


def register(model_type: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.model_type = model_type
        MODEL_REGISTRY[model_type] = cls
        return cls

    return wrap


def get_model_class(model_type: str) -> type | None:
    from . import families  # noqa: F401 - populates the registry

    return MODEL_REGISTRY.get(model_type)
