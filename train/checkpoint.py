"""Checkpoints of a run folder: `RUN/step-N/{model, train_state, trainer.json}`, resumable at any world size and ep.

Contract:
- `train_state/` is a `torch.distributed.checkpoint` (DCP) folder of the parameters and AdamW state as global
  tensors: dense parameters are the FSDP2 `Shard(0)` DTensors as they are; every experts tensor becomes a DTensor
  over the ep mesh `("ep_dp", "ep")` with placements `[Replicate(), Shard(0)]` (the ep slice gathered over the ranks
  holding the same experts). DCP reshards on load, so a run saved at world W / ep E resumes at any W' / E' (with the
  same model and data); at the same shape the values are restored bit for bit.
- `trainer.json`: step, world, ep, run id, the data position (global, see `train/data.py`) and the arguments.
- `step-N` appears atomically (staged as `.step-N.partial`, then renamed); `RUN/run.json` names the run that owns the
  folder; a `--save` folder holding another run is refused. `--keep-last N` deletes older step folders after a save.
- `resolve_resume("RUN/latest" | "RUN" | "RUN/step-N")` -> the step folder and its `trainer.json`, or a one-line error.
- `cut_metrics(path, step)`: drops metrics rows past the resumed step, so a resumed run's rows follow on.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainError

STEP = "step-"


def step_folders(root: Path) -> list[Path]:
    found = [p for p in root.glob(f"{STEP}*") if p.is_dir() and p.name[len(STEP):].isdigit() and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP):]))


def resolve_resume(spec: str) -> tuple[Path, dict[str, Any]]:
    path = Path(spec)
    if path.name == "latest" or (path.is_dir() and not (path / "trainer.json").exists() and step_folders(path)):
        root = path.parent if path.name == "latest" else path
        steps = step_folders(root) if root.is_dir() else []
        if not steps:
            raise TrainError(f"--resume {spec}: no step-N folders with trainer.json in {root}")
        path = steps[-1]
    meta_file = path / "trainer.json"
    if not meta_file.is_file():
        raise TrainError(f"--resume {spec}: no trainer.json here; give a step folder written by --save (e.g. ./ckpt/step-200) or RUN/latest")
    try:
        meta = json.loads(meta_file.read_text())
        _ = meta["step"], meta["args"], meta["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TrainError(f"--resume {spec}: trainer.json is not from this trainer's checkpoints ({e!r})") from None
    if not (path / "train_state" / ".metadata").is_file():
        raise TrainError(f"--resume {spec}: train_state/ is missing or incomplete (not a DCP checkpoint)")
    return path, meta


def claim_run_folder(root: Path, run_id: str) -> None:
    """Refuse a `--save` folder that holds another run; write `run.json` for ours (rank 0)."""
    owner = root / "run.json"
    if owner.is_file():
        other = json.loads(owner.read_text()).get("run_id")
        if other != run_id:
            raise TrainError(f"--save {root}: the folder holds another run ({other}); choose a new folder, or resume that run with --resume {root}/latest")
    elif step_folders(root) or (root / "metrics.jsonl").exists():
        raise TrainError(f"--save {root}: the folder holds checkpoints or metrics of an earlier run; choose a new folder")
    root.mkdir(parents=True, exist_ok=True)
    owner.write_text(json.dumps({"run_id": run_id}))


def cut_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def keep_last(root: Path, n: int) -> list[Path]:
    gone = step_folders(root)[:-n] if n else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ---------------------------------------------------------------- the DCP state


def _expert_ids(model: nn.Module) -> dict[int, nn.Module]:
    from ..parallel.expert_parallel import experts_modules

    return {id(p): m for _, m in experts_modules(model) for p in m.parameters(recurse=False)}


def _global_expert(t: torch.Tensor, mod: nn.Module, ep_root: Any) -> torch.Tensor:
    """This rank's ep slice of an experts tensor (gathered over ep_dp) as a `[Replicate(), Shard(0)]` DTensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    local = t.full_tensor() if isinstance(t, DTensor) else t
    shape = (mod._ep_num_experts if hasattr(mod, "_ep_num_experts") else local.shape[0], *local.shape[1:])
    stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
    return DTensor.from_local(local.detach().clone(), ep_root, [Replicate(), Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)


def _entry(t: torch.Tensor, mod: nn.Module | None, ep_root: Any) -> torch.Tensor:
    if t.dim() == 0:
        return t.detach().cpu().clone()
    if mod is not None:
        return _global_expert(t, mod, ep_root)
    return t.detach()


def dcp_state(model: nn.Module, optimizer: Any, ep_root: Any, ensure_optim: bool) -> dict[str, torch.Tensor]:
    """Parameters and AdamW state as global tensors keyed `param/<name>`, `optim/<name>/<key>` (module docstring)."""
    experts = _expert_ids(model)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        mod = experts.get(id(p))
        state[f"param/{name}"] = _entry(p, mod, ep_root)
        if ensure_optim and p not in optimizer.state:
            on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")  # AdamW's rule for `step`
            step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if p in optimizer.state:
            for k, v in optimizer.state[p].items():
                state[f"optim/{name}/{k}"] = _entry(v, mod, ep_root)
    return state


def save_train_state(path: Path, model: nn.Module, optimizer: Any, ep_root: Any) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(dcp_state(model, optimizer, ep_root, ensure_optim=False), checkpoint_id=str(path))


def load_train_state(path: Path, model: nn.Module, optimizer: Any, ep_root: Any, device: torch.device) -> None:
    """Read `path` (DCP) into the model's parameters and the optimizer's state, resharding as needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Replicate

    state = dcp_state(model, optimizer, ep_root, ensure_optim=True)
    dcp.load(state, checkpoint_id=str(path))
    experts = _expert_ids(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            targets = [(p, state[f"param/{name}"])] + [(v, state[f"optim/{name}/{k}"]) for k, v in optimizer.state[p].items()]
            for dst, src in targets:
                if dst.dim() == 0:
                    dst.copy_(src.to(dst.device))
                    continue
                if experts.get(id(p)) is not None:
                    src = src.to_local()  # the full ep slice; FSDP over ep_dp keeps its Shard(0) part of it
                    if isinstance(dst, DTensor):
                        src = DTensor.from_local(src.to(device), dst.device_mesh, [Replicate()], run_check=False).redistribute(dst.device_mesh, dst.placements).to_local()
                local_dst = dst.to_local() if isinstance(dst, DTensor) else dst
                local_src = src.to_local() if isinstance(src, DTensor) else src
                if local_dst.data_ptr() != local_src.data_ptr():
                    local_dst.copy_(local_src)
