"""Hand-written model-type records, one small data module per family (every module is loaded by `convert.registry`).

Each module registers its types' records: a `ModelSpec` (mapping, zoo class path, EP refusal) or, for a
conversion-only type, a bare `MoEMapping`.

Each module's docstring names its on-disk layout group (from ../shared/docs/moe-layouts.md):
- G1: per expert, `model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight` (G1': the same under `feed_forward.`);
- G2: per expert, `block_sparse_moe.experts.e.{w1,w3,w2}.weight` (w1 gate, w3 up, w2 down), renamed to `mlp.`;
- G3: per expert, `backbone.layers.L.mixer.experts.e.{up,down}_proj.weight` (no gate), `backbone.` -> `model.`;
- G4: already fused on disk under other names (`input_linear [E, 2I, H]`, `output_linear`): renamings only;
- G5: fused on disk but transposed (`[E, H, 2I]`, `[E, I, H]`);
- G6: the hub stores the experts as the model holds them: no conversion.
"""
