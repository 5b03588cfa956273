"""GPT-OSS: the hub already stores the experts as the model holds them (G6), bf16 or MXFP4.

transformers 5.24 has no conversion entry for gpt_oss: `mlp.experts.gate_up_proj [E, H, 2I]` (gate/up interleaved
along the last dim), `gate_up_proj_bias [E, 2I]`, `down_proj [E, I, H]`, `down_proj_bias [E, H]`. MXFP4 hub files
hold `*_blocks [E, out, in/32, 16]` / `*_scales [E, out, in/32]` instead of the weights (kept bit for bit;
`merge --dequantize bf16` writes the bf16 weights, see `convert/quant.py`). All of these have a leading expert dim.
"""

from ..mapping import Layout, MoEMapping
from ..registry import register
from ..spec import ModelSpec

_X = "{prefix}layers.{layer}.mlp.experts"

register(
    ModelSpec(
        mapping=MoEMapping(
            model_type="gpt_oss",
            family="gpt_oss",
            disk_layout=Layout.FUSED,
            expert_tensors=tuple(
                f"{_X}.{n}{s}" for n in ("gate_up_proj", "down_proj") for s in ("", "_bias", "_blocks", "_scales")
            ),
            num_experts_fields=("num_local_experts",),
            intermediate_fields=("intermediate_size",),
            notes="disk equals model: gate_up_proj [E, H, 2I] interleaved, down_proj [E, I, H], biases; MXFP4 blocks/scales",
            extra={"fused": "gate_up_proj [E,H,2I] (interleaved), down_proj [E,I,H], biases"},
        ),
        zoo="automodel_convert.models.gpt_oss.GptOssForCausalLM",
        ep_unsupported="experts with biases and an interleaved layout",
    ),
)
