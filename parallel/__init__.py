"""Expert parallelism: meshes, sharded checkpoint load/save, token dispatch and EP + FSDP2 training.

```python
from automodel_convert.parallel import build_mesh, load_sharded, save_sharded
mesh = build_mesh(ep=4, dp_shard=2)                    # dp and ep views of the same ranks
state = load_sharded("Qwen/Qwen3-30B-A3B", mesh)       # each rank reads only its experts' bytes
save_sharded(state, "./out", mesh, layout="original")  # or "fused"; every rank writes its own bytes
```
Names are imported lazily so `import automodel_convert.parallel.ep_dispatch` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ParallelMesh": "mesh",
    "build_mesh": "mesh",
    "MeshError": "mesh",
    "load_sharded": "load",
    "LoadStats": "load",
    "ShardedState": "load",
    "predict_read_bytes": "load",
    "save_sharded": "save",
    "SaveResult": "save",
}

if TYPE_CHECKING:
    from .load import LoadStats, ShardedState, load_sharded, predict_read_bytes
    from .mesh import MeshError, ParallelMesh, build_mesh
    from .save import SaveResult, save_sharded


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LoadStats",
    "MeshError",
    "ParallelMesh",
    "SaveResult",
    "ShardedState",
    "build_mesh",
    "load_sharded",
    "predict_read_bytes",
    "save_sharded",
]
