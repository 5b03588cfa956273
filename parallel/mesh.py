"""Device meshes for data parallel x expert parallel training on the same ranks.

Contract: `build_mesh(ep=..., dp_shard=..., dp_replicate=...)` returns a `ParallelMesh` over all W ranks, where
`W = dp_replicate * dp_shard` (one of them may be left out and is inferred from the world size):
- Data parallel: every rank trains on its own data. `dp_root` is the 2-D mesh `("dp_replicate", "dp_shard")`
  (rank = replicate_index * dp_shard + shard_index, HSDP order) and `dp_mesh` is its flattened 1-D view `"dp"` over
  all W ranks.
- Expert parallel is a second view of the SAME ranks, not carved out of dp: `ep_root` is the 2-D mesh
  `("ep_dp", "ep")` of shape `(W // ep, ep)` (rank = ep_dp_index * ep + ep_index). Ranks of one `ep` group hold
  different experts (1/ep of them each, DTensor `Shard(0)`); ranks of one `ep_dp` group hold the same experts and
  form the "expert data-parallel" group over which expert gradients are reduced.
- `ep` must divide W. When `ep` divides `dp_shard`, every ep group lies inside one dp_shard group (the usual case:
  all-to-all stays inside a node).
- Works on CPU (gloo) and CUDA (nccl); `device_type` defaults to "cuda" when CUDA is available. When no process
  group exists, one is created from torchrun's environment variables, or a single-process group when there are none.
`parallel.expert_parallel.parallelize` takes it as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class MeshError(ValueError):
    """Sizes that do not describe a mesh over the world (one line, says what to change)."""


@dataclass
class ParallelMesh:
    """Named data-parallel and expert-parallel views of the same W ranks (see the module docstring)."""

    world: int
    dp_replicate: int
    dp_shard: int
    ep: int
    device_type: str
    dp_root: DeviceMesh  # ("dp_replicate", "dp_shard")
    dp_mesh: DeviceMesh  # ("dp",): all ranks, flattened
    ep_root: DeviceMesh  # ("ep_dp", "ep")

    @property
    def ep_mesh(self) -> DeviceMesh:
        """1-D mesh of the ranks that split the experts among themselves (size `ep`)."""
        return self.ep_root["ep"]

    @property
    def ep_dp_mesh(self) -> DeviceMesh:
        """1-D mesh of the ranks holding the same experts (size `W // ep`): expert gradient reduction."""
        return self.ep_root["ep_dp"]

    @property
    def ep_group(self):  # noqa: ANN201 - the ep process group (token dispatch)
        return self.ep_mesh.get_group()

    @property
    def ep_dp(self) -> int:
        return self.world // self.ep

    @property
    def rank(self) -> int:
        return self.dp_mesh.get_rank()

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def ep_rank(self) -> int:
        return self.ep_root.get_local_rank("ep")

    @property
    def ep_dp_rank(self) -> int:
        return self.ep_root.get_local_rank("ep_dp")

    @property
    def ranks(self) -> dict[str, int]:
        """This rank's index along every view: global rank, dp, dp_replicate, dp_shard, ep, ep_dp."""
        return {
            "rank": self.rank,
            "dp": self.dp_rank,
            "dp_replicate": self.dp_root.get_local_rank("dp_replicate"),
            "dp_shard": self.dp_root.get_local_rank("dp_shard"),
            "ep": self.ep_rank,
            "ep_dp": self.ep_dp_rank,
        }

    @property
    def sizes(self) -> dict[str, int]:
        return {"world": self.world, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "ep": self.ep, "ep_dp": self.ep_dp}

    def __getitem__(self, name: str) -> DeviceMesh:
        """`mesh["dp"]`, `mesh["dp_replicate"]`, `mesh["dp_shard"]`, `mesh["ep"]`, `mesh["ep_dp"]`: 1-D views."""
        if name == "dp":
            return self.dp_mesh
        if name in ("dp_replicate", "dp_shard"):
            return self.dp_root[name]
        if name in ("ep", "ep_dp"):
            return self.ep_root[name]
        raise KeyError(f"no mesh dim {name!r}; use dp, dp_replicate, dp_shard, ep or ep_dp")

    def load_sharded_state(self, src, *, revision: str | None = None):  # noqa: ANN001, ANN201
        """`parallel.load_sharded(src, self)`: the hook `models.AutoModelForCausalLM.from_pretrained(device_mesh=)`
        calls, so that models needs no import of parallel."""
        from .load import load_sharded

        return load_sharded(src, self, revision=revision)

    def __repr__(self) -> str:
        s = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"ParallelMesh({s}, device_type={self.device_type!r}, rank={self.rank})"


def _ensure_process_group(backend: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def mesh_sizes(world: int, ep: int, dp_shard: int | None, dp_replicate: int | None) -> tuple[int, int, int]:
    """Resolve `(dp_replicate, dp_shard, ep)` for `world` ranks; raises `MeshError` with the fix."""
    if ep < 1:
        raise MeshError(f"ep={ep} must be a positive integer")
    if dp_shard is None and dp_replicate is None:
        dp_replicate, dp_shard = 1, world
    elif dp_shard is None:
        if dp_replicate < 1 or world % dp_replicate:
            raise MeshError(f"dp_replicate={dp_replicate} does not divide the world size {world}")
        dp_shard = world // dp_replicate
    elif dp_replicate is None:
        if dp_shard < 1 or world % dp_shard:
            raise MeshError(f"dp_shard={dp_shard} does not divide the world size {world}")
        dp_replicate = world // dp_shard
    if dp_replicate * dp_shard != world:
        raise MeshError(f"dp_replicate * dp_shard = {dp_replicate} * {dp_shard} must equal the world size {world}")
    if world % ep:
        raise MeshError(f"ep={ep} must divide the world size {world} (ep ranks are a factorisation of the dp ranks)")
    return dp_replicate, dp_shard, ep


def build_mesh(
    ep: int = 1,
    dp_shard: int | None = None,
    dp_replicate: int | None = None,
    *,
    device_type: str | None = None,
) -> ParallelMesh:
    """Data-parallel and expert-parallel meshes over all ranks (initialises the process group if needed)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    _ensure_process_group("nccl" if device_type == "cuda" else "gloo")
    world = dist.get_world_size()
    dp_replicate, dp_shard, ep = mesh_sizes(world, ep, dp_shard, dp_replicate)
    if device_type == "cuda":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    dp_root = init_device_mesh(device_type, (dp_replicate, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    dp_mesh = dp_root["dp_replicate", "dp_shard"]._flatten("dp")
    ep_root = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("ep_dp", "ep"))
    return ParallelMesh(world, dp_replicate, dp_shard, ep, device_type, dp_root, dp_mesh, ep_root)
