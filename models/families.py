"""Imports every zoo family so that each registers itself (one file per family under models/)."""

from . import deepseek_v3, dots1, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401
