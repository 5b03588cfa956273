"""One record per model type (`ModelSpec`), like torchtitan's `ModelSpec`: every fact about a type in one place.

Contract: a `ModelSpec` holds
- `mapping`: the type's conversion mapping (`MoEMapping`: renamings, expert groups, hub layout, config fields);
- `zoo`: the dotted path of the zoo class (`"automodel_convert.models.qwen3_moe.Qwen3MoeForCausalLM"`), or None
  when the type converts only (transformers' own class then runs it). A string, so that `convert` never imports
  `models`; `models.registry.get_model_class` imports it on first use;
- `ep_unsupported`: why expert parallelism refuses the type (None: supported), read by `parallel` and `train`;
- `num_experts(config)`: E from a config (a `config.json` dict or a transformers config object), the one function
  every layer uses (None when the config does not say, e.g. types whose E comes from the checkpoint's keys).
Records are declared beside their mapping in `convert/families/<family>.py` and registered with
`convert.registry.register`; types translated from transformers get a record with the mapping only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .mapping import MoEMapping


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    mapping: MoEMapping
    zoo: str | None = None
    ep_unsupported: str | None = None

    def __post_init__(self) -> None:
        if self.zoo is not None and "." not in self.zoo:
            raise ValueError(f"{self.model_type}: zoo must be a dotted path module.Class, not {self.zoo!r}")

    @property
    def model_type(self) -> str:
        return self.mapping.model_type

    @property
    def names(self) -> tuple[str, ...]:
        """The type and its aliases: every name the record answers to."""
        return (self.mapping.model_type, *self.mapping.aliases)

    def num_experts(self, config: Mapping[str, Any] | Any) -> int | None:
        """E from `config` by the mapping's config fields (`num_experts_fields`, under `text_config_field` too)."""
        return self.mapping.num_experts(_as_dict(config))


def _as_dict(config: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    """A `config.json` dict as it is; a transformers config object as its `to_dict()` (sub-configs nested)."""
    if isinstance(config, Mapping):
        return config
    return config.to_dict()
