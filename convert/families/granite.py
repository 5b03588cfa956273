"""Granite MoE family: experts already fused on disk under other names (G4).

transformers 5.24 ("granitemoe", shared by granitemoeshared and granitemoehybrid), renames only:
`block_sparse_moe.input_linear.weight [E, 2I, H]` -> `block_sparse_moe.experts.gate_up_proj`,
`block_sparse_moe.output_linear.weight [E, H, I]` -> `block_sparse_moe.experts.down_proj`,
`block_sparse_moe.router.layer.weight` -> `block_sparse_moe.router.weight`. The fused tensors are declared as groups
(disk layout `fused`), so `merge --layout transposed` and `split --layout per_expert` work too; `shared_mlp.*`
and Mamba layers pass through.
"""

from ..mapping import Layout, MoEMapping, Rename, swiglu_groups
from ..registry import register

_M = "{prefix}layers.{layer}.block_sparse_moe"
_RENAMES = (
    Rename(f"{_M}.input_linear.weight", f"{_M}.experts.gate_up_proj"),
    Rename(f"{_M}.output_linear.weight", f"{_M}.experts.down_proj"),
    Rename(f"{_M}.router.layer.weight", f"{_M}.router.weight"),
)
_FIELDS = {"num_experts_fields": ("num_local_experts",), "intermediate_fields": ("intermediate_size",)}

register(
    *(
        MoEMapping(
            model_type=mt,
            family="granite",
            groups=swiglu_groups(f"{_M}.experts"),
            renames=_RENAMES,
            disk_layout=Layout.FUSED,
            **_FIELDS,
            notes=note,
        )
        for mt, note in (
            ("granitemoe", "input_linear/output_linear -> experts.gate_up_proj/down_proj"),
            ("granitemoeshared", "as granitemoe; shared_mlp passes through"),
            ("granitemoehybrid", "as granitemoe; shared_mlp and Mamba layers pass through"),
        )
    )
)
