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

MAX_PARAMS = 8_000_000
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
_GEMMA4_MOE = dict(
    enable_moe_block=True,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=24,
    vocab_size_per_layer_input=256,
    hidden_size_per_layer_input=16,
)
_QWEN4_INDEXER = dict(
    indexer_n_heads=2,
    indexer_kv_heads=1,
    indexer_head_dim=16,
    indexer_budget=64,
    indexer_compress_ratio=4,
    ngram_vocab_size_base=256,
    split_ngram_parts=2,
    heads_per_ngram=2,
)
# a loop of 2 layers (1 and 2: the loop must start after layer 0, at a multiple of the attention-residual block)
_INKLING2_LOOP = dict(
    num_hidden_layers=3,
    layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
    unpadded_vocab_size=250,
    loop_layer_index_start=1,
    loop_layer_index_end=3,
    n_layers_per_attn_res_block=1,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=16,
)
OVERRIDES: dict[str, dict[str, Any]] = {
    "longcat_flash": {"head_dim": 8},  # the fixture's MLA dims; the rotary size follows head_dim
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
    "gemma4_text": _GEMMA4_MOE,  # the default config has no MoE block
    "gemma4": {"text_config": _GEMMA4_MOE},
    "qwen4_exp_text": _QWEN4_INDEXER,  # the default leaves the indexer unset
    "qwen4_exp": {"text_config": _QWEN4_INDEXER},
    "hy_v4_vl_text": {"rope_parameters": {"mrope_section": [2, 1, 1]}},  # sums to qk_rope_head_dim // 2
    "hy_v4_vl": {"text_config": {"rope_parameters": {"mrope_section": [2, 1, 1]}}},
    "inkling2_text": {"unpadded_vocab_size": 250},
    "inkling2": {"text_config": {"unpadded_vocab_size": 250}, "vision_config": {"text_hidden_size": 64}},
    "inkling2_loop_text": _INKLING2_LOOP,
    "inkling2_loop": {"text_config": _INKLING2_LOOP, "vision_config": {"text_hidden_size": 64}},
    "dots3_note_text": {"head_dim": 16},  # the sliding-window head is qk_nope + qk_rope
    "dots3_note": {
        "text_config": {"head_dim": 16},
        "vision_config": {"adapter_in_dim": 64, "adapter_out_dim": 64},
        "audio_config": {"adapter_input_size": 64, "adapter_out_dim": 64},  # the audio hidden size; the text's
    },
    "ernie4_5_vl_moe": {  # the 3-D rotary sections sum to head_dim // 2; text and vision experts of different sizes
        "text_config": {"rope_parameters": {"mrope_section": [3, 3, 2]}, "moe_intermediate_size": [24, 16], "moe_k": 2},
    },
    "glm4v_moe_text": {"rope_parameters": {"mrope_section": [2, 1, 1]}},  # sums to the rotary half
    "diffusion_gemma": {"text_config": {k: v for k, v in _GEMMA4_MOE.items() if k != "enable_moe_block"}},
    # the default leaves both None (per-layer MLP kinds are indexed, top-k is passed to torch.topk)
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse"], "num_experts_per_tok": 2}},
    "inkling_mm_model": {  # a dense layer too (its MLP's w13_dn is converted); the vision depth is `n_layers`
        "text_config": {"mlp_layer_types": ["dense", "sparse"]},
        "vision_config": {"n_layers": 3, "patch_size": 2, "temporal_patch_size": 2},  # n_layers >= its 3 scales: no scipy
    },
    "step3p7": {"text_config": {"sliding_window": 16}},  # the forward builds a sliding mask; the default leaves it None
    "muse_spark_text": {"moe_hidden_size": 24},
    "muse_spark": {"text_config": {"moe_hidden_size": 24}, "projector_hidden_size": 64},
}


def _shrink_value(k: str, v: Any, n_old: int | None) -> Any:
    """The tiny value of config field `k` (default `v`), or `v` itself."""
    if k in SMALL and v and not isinstance(v, (dict, list)):  # zeros (e.g. NoPE qk_rope_head_dim=0) stay
        return SMALL[k]
    if not n_old or not isinstance(v, (list, dict)) or not v:
        return v
    if isinstance(v, dict) and all(str(x).isdigit() for x in v):  # per-layer overrides keyed by layer index
        return {x: y for x, y in v.items() if int(x) < SMALL["num_hidden_layers"]}
    if isinstance(v, list) and len(v) == n_old:  # one entry per layer: the first, and the first other kind
        return [v[0], next((x for x in v if x != v[0]), v[1])]
    if k.endswith("_layers") and all(type(x) is int and x < n_old for x in v):
        # layer indices: MoE layers among the kept ones, at most layer 0 dense (e.g. mlp_only_layers)
        return [x for x in v if x < (SMALL["num_hidden_layers"] if "moe" in k or "sparse" in k else 1)]
    return v


def _shrink(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict()
    n_old = d.get("num_hidden_layers")
    kw = {k: _shrink_value(k, v, n_old) for k, v in d.items()}
    if d.get("qk_rope_head_dim"):  # MLA: rotary on qk_rope_head_dim (of a head of nope + rope), KV heads = heads
        whole = d.get("head_dim") == (d.get("qk_nope_head_dim") or 0) + d["qk_rope_head_dim"]
        kw["head_dim"] = SMALL["qk_rope_head_dim"] + (SMALL["qk_nope_head_dim"] if whole else 0)
    if d.get("kv_lora_rank"):
        kw["num_key_value_heads"] = SMALL["num_attention_heads"]
    for name in getattr(cfg, "sub_configs", None) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kw[name] = _shrink(sub)
    kw.pop("model_type", None)
    return kw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@functools.cache
def _fixture_specs() -> dict[str, dict]:
    """The bundled fixtures' tiny configs (fixtures/fixture_specs.py), for the types that have one."""
    path = Path(__file__).resolve().parent.parent / "fixtures" / "fixture_specs.py"
    spec = importlib.util.spec_from_file_location("_fixture_specs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {k: v for k, v in mod.FIXTURES.items() if k == v["model_type"]}


def tiny_config(model_type: str) -> Any:
    import transformers

    if model_type == "qwen3_omni_moe_thinker":  # the thinker of the bundled qwen3_omni_moe fixture
        thinker = json.loads(json.dumps(_fixture_specs()["qwen3_omni_moe"]["config"]["thinker_config"]))
        return transformers.CONFIG_MAPPING[model_type](**thinker)
    if model_type in _fixture_specs():
        kw = json.loads(json.dumps(_fixture_specs()[model_type]["config"]))
        return transformers.CONFIG_MAPPING[model_type](**_merge(kw, OVERRIDES.get(model_type, {})))
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
