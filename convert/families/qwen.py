"""Qwen MoE families: `mlp.experts.{e}.{gate,up,down}_proj` per expert (G1), except where the hub is already fused.

transformers 5.24: qwen2_moe's two converters (`gate|up -> gate_up_proj [E, 2I, H]`, `down -> down_proj [E, H, I]`)
are shared by qwen3_moe, qwen3_next, qwen3_omni_moe (and its thinker/talker text models) and qwen3_5_moe_text.
- qwen2_moe / qwen3_next: `shared_expert.*` + `shared_expert_gate` pass through; dense layers (`mlp_only_layers`,
  `decoder_sparse_step`) simply have no expert keys.
- qwen3_omni_moe: two MoE stacks, the thinker's (`thinker.model.layers`, moved under `thinker.model.language_model`
  like transformers' Qwen2.5-Omni thinker renames, with `thinker.audio_tower` / `thinker.visual` under
  `thinker.model.`) and the talker's (`talker.model.layers`, its own E and I). E is taken per layer from the keys,
  because one config field cannot describe both stacks; code2wav and the towers pass through.
- qwen3_5_moe: the hub already stores `model.language_model.layers.L.mlp.experts.gate_up_proj [E, 2I, H]` /
  `down_proj [E, H, I]` (disk layout `fused`): merge copies through, `split --layout per_expert` can still split.
- qwen3_vl_moe: the hub stores the experts fused but transposed, `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]`
  (transformers transposes on load only when the shapes differ, so it silently loads square `2I == H` or
  `I == H` checkpoints wrong, and saves the untransposed layout); the layout is declared here, never guessed from
  shapes.
"""

from ..mapping import Layout, MoEMapping, Rename, swiglu_groups
from ..registry import register
from ..spec import ModelSpec

_QWEN = {"family": "qwen", "groups": swiglu_groups(), "intermediate_fields": ("moe_intermediate_size",)}
_THINKER = tuple(
    Rename(disk, model)
    for disk, model in (
        ("thinker.model.layers.{rest}", "thinker.model.language_model.layers.{rest}"),
        ("thinker.model.embed_tokens.{rest}", "thinker.model.language_model.embed_tokens.{rest}"),
        ("thinker.model.norm.{rest}", "thinker.model.language_model.norm.{rest}"),
        ("thinker.audio_tower.{rest}", "thinker.model.audio_tower.{rest}"),
        ("thinker.visual.{rest}", "thinker.model.visual.{rest}"),
    )
)

register(
    ModelSpec(
        mapping=MoEMapping(model_type="qwen3_moe", num_experts_fields=("num_experts", "num_local_experts"), **_QWEN),
        zoo="automodel_convert.models.qwen3_moe.Qwen3MoeForCausalLM",
    ),
    ModelSpec(
        mapping=MoEMapping(model_type="qwen2_moe", num_experts_fields=("num_experts",), **_QWEN),
        zoo="automodel_convert.models.qwen2_moe.Qwen2MoeForCausalLM",
    ),
    MoEMapping(model_type="qwen3_next", num_experts_fields=("num_experts",), **_QWEN),
    MoEMapping(
        model_type="qwen3_omni_moe",
        family="qwen",
        groups=swiglu_groups(),
        renames=_THINKER,
        num_experts_fields=(),
        intermediate_fields=(),
        notes="thinker and talker MoE stacks (E per stack from the keys); audio/vision towers and code2wav pass through",
        extra={
            "prefix": "thinker.model.language_model.",
            "also": "talker.model.",
            "config": "thinker_config.text_config, talker_config.text_config",
        },
    ),
    MoEMapping(
        model_type="qwen3_5_moe",
        disk_layout=Layout.FUSED,
        num_experts_fields=("num_experts",),
        text_config_field="text_config",
        notes="hub checkpoints are already fused; vision tower passes through",
        extra={"prefix": "model.language_model."},
        **_QWEN,
    ),
    MoEMapping(
        model_type="qwen3_vl_moe",
        disk_layout=Layout.TRANSPOSED,
        num_experts_fields=("num_experts", "num_local_experts"),
        text_config_field="text_config",
        notes="hub checkpoints are fused and transposed ([E, H, 2I] / [E, I, H]); vision tower passes through",
        extra={"prefix": "model.language_model."},
        **_QWEN,
    ),
)
