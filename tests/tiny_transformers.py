"""Tiny models of every transformers model type with fused experts, built from transformers' own classes.

`tiny_model(model_type)` shrinks the type's default config (few layers, small hidden size, 4 experts; per-type
overrides in `OVERRIDES` where a config validates its own shape rules), checks the size on the meta device first
(never allocates a full-size model), then builds it in float32 with seeded random values in every tensor.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MAX_PARAMS = 3_000_000
SMALL: dict[str, Any] = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, expert_ffn_hidden_size=24,
    shared_expert_intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
    num_experts=4, n_routed_experts=4, num_local_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_topk=2,
    first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=256, max_window_layers=2,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, qk_head_dim=16,
    depth=1, out_hidden_size=64, num_heads=2, embed_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# model type -> config kwargs (top level, or {"text_config": {...}}) that its own validators need on top of SMALL
OVERRIDES: dict[str, dict[str, Any]] = {}


def _shrink(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict()
    n_old = d.get("num_hidden_layers")
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k in SMALL and v is not None and not isinstance(v, (dict, list)):
            kw[k] = SMALL[k]
        elif isinstance(v, list) and n_old and len(v) == n_old:
            kw[k] = v[-2:]
        elif k.endswith("_layers") and isinstance(v, list) and all(isinstance(x, int) for x in v):
            kw[k] = [x for x in v if x < 1]  # layer indices (e.g. mlp_only_layers): at most layer 0 stays dense
    if d.get("qk_rope_head_dim") is not None:  # MLA: rotary on qk_rope_head_dim, as many KV heads as heads
        kw.update(head_dim=SMALL["qk_rope_head_dim"], num_key_value_heads=SMALL["num_attention_heads"])
    for name in getattr(cfg, "sub_configs", None) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kw[name] = _shrink(sub)
    out = {**d, **kw}
    out.pop("model_type", None)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@functools.cache
def _fixture_specs() -> dict[str, dict]:
    """The bundled fixtures' tiny configs (fixtures/make_fixtures.py), for the types that have one."""
    path = Path(__file__).resolve().parent.parent / "fixtures" / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("_make_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {k: v for k, v in mod.FIXTURES.items() if k == v["model_type"]}


def tiny_config(model_type: str) -> Any:
    import transformers

    if model_type in _fixture_specs():
        return transformers.CONFIG_MAPPING[model_type](**json.loads(json.dumps(_fixture_specs()[model_type]["config"])))
    kw = _merge(_shrink(transformers.AutoConfig.for_model(model_type)), OVERRIDES.get(model_type, {}))
    return transformers.AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, class_name: str, seed: int = 0) -> Any:
    """The tiny float32 model; raises when it cannot be built or is not tiny."""
    import transformers

    cls = getattr(transformers, class_name)
    cfg = tiny_config(model_type)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls._from_config(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"tiny config of {model_type} still has {n} parameters")
    torch.manual_seed(seed)
    model = cls._from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.state_dict(keep_vars=True).items()):
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model
