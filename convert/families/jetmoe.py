"""JetMoE: the hub already stores the experts as the model holds them (G6).

transformers 5.24 has no conversion entry for jetmoe: MoE MLP `mlp.input_linear.weight [E, 2I, H]` /
`mlp.output_linear.weight [E, H, I]` and mixture-of-attention experts `self_attention.experts.input_linear.weight`
/ `output_linear.weight`, on disk and in the model.
"""

from ..mapping import Layout, MoEMapping
from ..registry import register

_L = "{prefix}layers.{layer}"

register(
    MoEMapping(
        model_type="jetmoe",
        family="jetmoe",
        disk_layout=Layout.FUSED,
        expert_tensors=tuple(
            f"{_L}.{m}.{p}.weight" for m in ("mlp", "self_attention.experts") for p in ("input_linear", "output_linear")
        ),
        num_experts_fields=("num_local_experts",),
        intermediate_fields=("intermediate_size",),
        notes="disk equals model: mlp.input_linear [E,2I,H], output_linear [E,H,I]; attention experts too",
        # under `experts.` but not per-expert tensors: the attention experts' shared bias and router
        not_experts=(f"{_L}.self_attention.experts.bias", f"{_L}.self_attention.experts.router.layer.weight"),
        extra={"fused": "input_linear [E,2I,H], output_linear [E,H,I] (mlp and attention experts)"},
    ),
)
