"""Tuned MoE model zoo with transformers v5 parameter names and fused expert layouts.

    from automodel_convert.models import AutoModelForCausalLM, BackendConfig
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B", dtype=torch.bfloat16,
                                                 backend=BackendConfig(attn="sdpa", experts="grouped_mm"))
    out = model.generate(input_ids, max_new_tokens=32)   # transformers' GenerationMixin, DynamicCache KV cache
    model.save_pretrained("./out")               # per-expert original layout; layout="fused" on request

Zoo families (`zoo_types()`, each named by its type's record `convert.spec.ModelSpec.zoo`; parity with transformers
tested for every one): qwen3_moe, qwen2_moe, olmoe, mixtral, deepseek_v3, glm4_moe, glm4_moe_lite, dots1, gpt_oss
(one file each under models/, shared parts under models/common/). Other MoE types load as transformers' own class with our grouped
experts registered through its experts interface.
"""

from .auto import AutoModelForCausalLM
from .backend import BackendConfig, MissingPackageError
from .common.model import MoECausalLM
from .registry import VERIFIED, get_model_class, zoo_types

__all__ = [
    "VERIFIED",
    "AutoModelForCausalLM",
    "BackendConfig",
    "MissingPackageError",
    "MoECausalLM",
    "get_model_class",
    "zoo_types",
]
