"""What transformers' `GenerationMixin` needs from a model that is not a `PreTrainedModel`.

Contract: `ZooGenerationMixin` is mixed into `MoECausalLM` (after nn.Module). It gives `generate()` (transformers'
own, unchanged: greedy, sampling, beam search, streamers, stopping criteria) with the attributes and methods the
mixin reads from its host class (transformers/_typing.py `GenerativePreTrainedModel`): `generation_config`,
`can_generate`, `device`, `dtype` (transformers' rule: the first floating parameter), `main_input_name`,
`get_input_embeddings` / `get_output_embeddings`, `get_experts_implementation` (none: the zoo's experts do not
switch for decoding). `prepare_inputs_for_generation` is the mixin's default (slices the new tokens, forwards
`cache`, `position_ids`, `attention_mask`, `use_cache`, `logits_to_keep`).
The KV cache is the default one `generate` makes, transformers' `DynamicCache` (sliding-window layers included).
Caches with a fixed size (`cache_implementation="static"`, "offloaded_static", ...) and `torch.compile`d decoding
are not supported: the model's forward refuses them (see `check_cache`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin


def default_generation_config(config: Any) -> GenerationConfig:
    """What a transformers model holds before any generation_config.json is read (`from_model_config`)."""
    try:
        return GenerationConfig.from_model_config(config)
    except NotImplementedError:
        return GenerationConfig()


def load_generation_config(src: str, config: Any, revision: str | None = None) -> GenerationConfig:
    """The checkpoint's generation_config.json, else the one derived from `config` (transformers' rule)."""
    try:
        return GenerationConfig.from_pretrained(src, revision=revision)
    except OSError:
        return default_generation_config(config)


def check_cache(cache: Any) -> None:
    """The zoo's attention reads the keys a cache returns as the most recent ones, which only grow-as-you-go caches
    (DynamicCache and its layers) guarantee: a preallocated (compileable) cache is refused."""
    if getattr(cache, "is_compileable", False):
        raise NotImplementedError(
            f"{type(cache).__name__} is not supported by the zoo models: use transformers' DynamicCache "
            "(generate's default, cache_implementation=None or 'dynamic')"
        )


class ZooGenerationMixin(GenerationMixin):
    main_input_name: ClassVar[str] = "input_ids"
    base_model_prefix: ClassVar[str] = "model"
    input_modalities: ClassVar[str] = "text"
    _is_stateful: ClassVar[bool] = False

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def is_remote_code(cls) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self.get_output_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_experts_implementation(self) -> dict[str, str | None]:
        return {"": None}
