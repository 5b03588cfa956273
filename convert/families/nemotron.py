"""Nemotron-H: relu^2 experts without a gate, `backbone.layers.L.mixer.experts.{e}.{up,down}_proj` (G3).

transformers 5.24 ("nemotron_h"): `backbone.` -> `model.`, `mixer.experts.*.up_proj -> mixer.experts.up_proj
[E, I, H]`, `mixer.experts.*.down_proj -> mixer.experts.down_proj [E, H, I]`. Mamba and attention mixers, the
router (`mixer.gate`) and `mixer.shared_experts.*` pass through.
"""

from ..mapping import ExpertGroup, MoEMapping, Rename
from ..registry import register

_X = "{prefix}layers.{layer}.mixer.experts"

register(
    MoEMapping(
        model_type="nemotron_h",
        family="nemotron",
        groups=(
            ExpertGroup(fused=f"{_X}.up_proj", parts=(f"{_X}.{{expert}}.up_proj.weight",)),
            ExpertGroup(fused=f"{_X}.down_proj", parts=(f"{_X}.{{expert}}.down_proj.weight",)),
        ),
        renames=(Rename("backbone.{rest}", "model.{rest}"),),
        num_experts_fields=("n_routed_experts",),
        intermediate_fields=("moe_intermediate_size",),
        notes="backbone. -> model.; no gate projection",
    ),
)
