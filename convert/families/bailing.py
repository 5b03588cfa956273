"""Bailing hybrid (Ling/Ring linear): per-expert `mlp.experts.{e}.*_proj` (G1) plus attention renames.

transformers 5.24 ("bailing_hybrid"), in order: `model.word_embeddings.` -> `model.embed_tokens.`, `.attention.` ->
`.self_attn.`, `self_attn.{f_proj,dt_bias,A_log}` -> `self_attn.forget_gate.*`, `{q,k,v}_conv1d.weight`
concatenated along dim 0 into `conv1d.weight` (a non-stacked fusion here), `.self_attn.dense.` -> `.self_attn.o_proj.`,
`.mlp.gate.expert_bias` -> `.mlp.gate.e_score_correction_bias`, and qwen2_moe's expert converters.
"""

from ..mapping import MoEMapping, Rename, swiglu_groups, tensor_fusion
from ..registry import register

_L = "{prefix}layers.{layer}"
_ATTN = f"{_L}.self_attn"

register(
    MoEMapping(
        model_type="bailing_hybrid",
        family="bailing",
        groups=swiglu_groups()
        + (
            tensor_fusion(
                f"{_ATTN}.conv1d.weight",
                tuple(f"{_ATTN}.{p}_conv1d.weight" for p in ("q", "k", "v")),
            ),
        ),
        renames=(
            Rename("model.word_embeddings.{rest}", "model.embed_tokens.{rest}"),
            Rename(f"{_L}.attention.{{rest}}", f"{_ATTN}.{{rest}}"),
            Rename(f"{_ATTN}.f_proj.{{rest}}", f"{_ATTN}.forget_gate.f_proj.{{rest}}"),
            Rename(f"{_ATTN}.dt_bias", f"{_ATTN}.forget_gate.dt_bias"),
            Rename(f"{_ATTN}.A_log", f"{_ATTN}.forget_gate.A_log"),
            Rename(f"{_ATTN}.dense.{{rest}}", f"{_ATTN}.o_proj.{{rest}}"),
            Rename(f"{_L}.mlp.gate.expert_bias", f"{_L}.mlp.gate.e_score_correction_bias"),
        ),
        num_experts_fields=("num_experts",),
        intermediate_fields=("moe_intermediate_size",),
        notes="attention.* -> self_attn.*, q/k/v_conv1d -> conv1d, word_embeddings -> embed_tokens, expert_bias -> e_score_correction_bias",
    ),
)
