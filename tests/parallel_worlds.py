"""Shared by the expert-parallel load/save tests (`test_parallel_load_save.py`, `test_parallel_save_failures.py`):
the fixture families, independent references (`safetensors.torch.load_file` plus `torch.stack`/`torch.cat`, not
the planner), and the spawned gloo worlds whose ranks load, check and save and write per-rank reports."""

from __future__ import annotations

import json
import math
import os
import re
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from automodel_convert.convert.errors import ConvertError
from automodel_convert.convert.registry import get_mapping

from conftest import FIXTURES, folder_tensors
from spawn_ranks import init_gloo, spawn_ranks

# fixture name -> model_type; the spawned worlds load all of them (those without a fixture or mapping are skipped)
FAMILIES = {
    "mixtral": "mixtral",  # E=6 float32, 3 shards: ep=4 leaves rank 3 without experts
    "qwen3_moe": "qwen3_moe",  # E=12, experts.10 sorts before experts.2
    "deepseek_v3": "deepseek_v3",  # dense first layer, shared experts, score bias, E=8 (3/3/2 on 3 ranks)
    "deepseek_v3_fp8": "deepseek_v3",  # block FP8 weights + weight_scale_inv grids
    "gpt_oss": "gpt_oss",  # native fused layout with biases
    "gpt_oss_mxfp4": "gpt_oss",  # MXFP4 *_blocks / *_scales
    "olmoe": "olmoe",  # float16
    "qwen3_5_moe": "qwen3_5_moe",  # fused on the hub
    "qwen3_vl_moe": "qwen3_vl_moe",  # transposed on the hub
}
_RENAMES = {"mixtral": [("block_sparse_moe.", "mlp.")]}
_PART = re.compile(r"^(?P<pre>.*\.experts)\.(?P<e>\d+)\.(?P<part>\w+)\.(?P<suf>weight|weight_scale_inv)$")
_GATE, _UP, _DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")
_NATIVE_EXPERT = re.compile(r"\.experts\.[a-z_]+$")
WORLD_TIMEOUT = 150


def missing_reason(fixture: str) -> str | None:
    if not (FIXTURES / fixture / "config.json").exists():
        return f"fixture {fixture} not generated yet (fixtures/make_fixtures.py)"
    try:
        get_mapping(FAMILIES[fixture])
    except ConvertError:
        return f"no {FAMILIES[fixture]} mapping registered in convert/families yet"
    return None


# ---------------------------------------------------------------- independent references




def reference_fused(fixture: str, folder: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Full fused tensors in model naming from the raw files (stack of cat(gate, up), stack of down) + expert names.

    Works on the hub layouts of the families above: per-expert keys are fused, fused/native ones kept. A transposed
    (qwen3_vl_moe) source is transposed back per expert.
    """
    raw = folder_tensors(folder)
    for a, b in _RENAMES.get(FAMILIES[fixture], []):
        raw = {k.replace(a, b): v for k, v in raw.items()}
    parts: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    experts: set[str] = set()
    for k, v in raw.items():
        m = _PART.match(k)
        if m is None:
            out[k] = v
            if _NATIVE_EXPERT.search(k):
                experts.add(k)
            continue
        kind = "gate" if m["part"] in _GATE else "up" if m["part"] in _UP else "down"
        parts.setdefault((m["pre"], m["suf"]), {}).setdefault(int(m["e"]), {})[kind] = v
    for (pre, suf), by_e in parts.items():
        tail = "" if suf == "weight" else "_scale_inv"
        es = sorted(by_e)
        out[f"{pre}.gate_up_proj{tail}"] = torch.stack([torch.cat([by_e[e]["gate"], by_e[e]["up"]], 0) for e in es])
        out[f"{pre}.down_proj{tail}"] = torch.stack([by_e[e]["down"] for e in es])
        experts |= {f"{pre}.gate_up_proj{tail}", f"{pre}.down_proj{tail}"}
    if fixture == "qwen3_vl_moe":  # hub [E, H, 2I] / [E, I, H] -> model [E, 2I, H] / [E, H, I]
        for k in [k for k in out if k.endswith((".gate_up_proj", ".down_proj"))]:
            out[k] = out[k].transpose(1, 2).contiguous()
    return out, experts


def chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    step = math.ceil(n / parts)
    return min(i * step, n), min((i + 1) * step, n)


def expected_bytes(folder: Path, experts_of: dict, ep: int, ep_rank: int) -> int:
    """Expert bytes this ep rank owns plus every non-expert byte, from the raw files."""
    total = 0
    for k, v in folder_tensors(folder).items():
        nbytes = v.numel() * v.element_size()
        m = _PART.match(k)
        if m is not None:
            lo, hi = chunk(experts_of["E"], ep, ep_rank)
            total += nbytes if lo <= int(m["e"]) < hi else 0
        elif ".experts." in k and v.dim() >= 1:  # fused / native expert tensor: its Shard(0) rows
            lo, hi = chunk(v.shape[0], ep, ep_rank)
            total += (hi - lo) * (nbytes // v.shape[0])
        else:
            total += nbytes
    return total


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


# ---------------------------------------------------------------- the spawned worlds


def _check_state(fixture: str, folder: Path, state, mesh, ep: int, dense: str, expert_dp: str) -> list[str]:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    ref, expert_names = reference_fused(fixture, folder)
    errs = []
    if set(state) != set(ref):
        errs.append(f"names differ: extra {sorted(set(state) - set(ref))[:3]} missing {sorted(set(ref) - set(state))[:3]}")
    for name, dt in state.items():
        if name not in ref:
            continue
        full = ref[name]
        if not isinstance(dt, DTensor) or tuple(dt.shape) != tuple(full.shape) or dt.dtype != full.dtype:
            errs.append(f"{name}: {type(dt).__name__} {tuple(dt.shape)} {dt.dtype} vs {tuple(full.shape)} {full.dtype}")
            continue
        local = dt.to_local()
        if name in expert_names:
            lo, hi = chunk(full.shape[0], ep, mesh.ep_rank)
            want = full[lo:hi]
            inner = Replicate()
            if expert_dp == "shard" and full.dim() >= 2:
                a, b = chunk(full.shape[1], mesh.ep_dp, mesh.ep_dp_rank)
                want, inner = want[:, a:b], Shard(1)
            if tuple(dt.placements) != (inner, Shard(0)) or dt.device_mesh.mesh_dim_names != ("ep_dp", "ep"):
                errs.append(f"{name}: expert placements {dt.placements} on {dt.device_mesh.mesh_dim_names}")
        elif dense == "shard" and full.dim() >= 1:
            shard_rank = mesh.rank % mesh.dp_shard
            lo, hi = chunk(full.shape[0], mesh.dp_shard, shard_rank)
            want = full[lo:hi]
        else:
            want = full
            if tuple(dt.placements) != (Replicate(),):
                errs.append(f"{name}: dense placements {dt.placements}")
        if tuple(local.shape) != tuple(want.shape) or not torch.equal(_bits(local), _bits(want)):
            errs.append(f"{name}: local shard {tuple(local.shape)} differs from the reference slice {tuple(want.shape)}")
    return errs


def _mesh_job(mesh) -> dict:  # noqa: ANN001
    """Group membership of every view, and an all-reduce over the expert data-parallel group."""
    x = torch.tensor([float(mesh.rank)])
    dist.all_reduce(x, group=mesh.ep_dp_mesh.get_group())
    return {
        "errors": [],
        "sizes": mesh.sizes,
        "rank": mesh.rank,
        "groups": {d: sorted(dist.get_process_group_ranks(mesh[d].get_group())) for d in ("dp", "dp_replicate", "dp_shard", "ep", "ep_dp")},
        "local": mesh.ranks,
        "ep_dp_sum": x.item(),
    }


def _overwrite_job(job: dict, mesh, dst: Path) -> dict:  # noqa: ANN001
    """An existing dst is refused on every rank (nobody hangs); overwrite=True replaces it, config= rewrites config.json."""
    from automodel_convert.parallel import load_sharded, save_sharded

    state = load_sharded(FIXTURES / job["fixture"], mesh)
    save_sharded(state, dst, mesh, layout="fused")
    res: dict = {"errors": []}
    try:
        save_sharded(state, dst, mesh, layout="original")
    except ConvertError as e:
        res["exists_error"] = str(e)
    config = dict(json.loads((FIXTURES / job["fixture"] / "config.json").read_text()), note="rewritten")
    save_sharded(state, dst, mesh, layout="original", overwrite=True, config=config)
    return res


def _target_job(job: dict, mesh) -> dict:  # noqa: ANN001
    """load_sharded into a meta-device state dict: bf16 -> float32 casts, strict name and shape checks."""
    from automodel_convert.parallel import load_sharded

    folder = FIXTURES / job["fixture"]
    ref, experts = reference_fused(job["fixture"], folder)
    meta = {k: torch.empty(v.shape, dtype=torch.float32 if v.dtype == torch.bfloat16 else v.dtype, device="meta") for k, v in ref.items()}
    state = load_sharded(folder, mesh, target=meta)
    errs = []
    for k, dt in state.items():
        want = ref[k][slice(*chunk(ref[k].shape[0], mesh.ep, mesh.ep_rank))] if k in experts else ref[k]
        if dt.dtype != meta[k].dtype or not torch.equal(dt.to_local(), want.to(meta[k].dtype)):
            errs.append(k)
    res: dict = {"errors": errs, "full_bytes": state.stats.bytes_read}
    dropped = sorted(experts)[0]
    partial = {k: v for k, v in meta.items() if k != dropped}
    try:
        load_sharded(folder, mesh, target=partial)
    except ConvertError as e:
        res["strict_error"] = str(e)
    loose = load_sharded(folder, mesh, target=partial, strict=False)
    res["skipped"], res["loose_bytes"] = loose.stats.skipped, loose.stats.bytes_read
    res["dropped"] = dropped
    bad = dict(meta, **{dropped: torch.empty(1, 2, device="meta")})
    try:
        load_sharded(folder, mesh, target=bad)
    except ConvertError as e:
        res["shape_error"] = str(e)
    # a transformers v5 model built on the meta device: its state dict names are exactly the loaded names
    from transformers import AutoConfig, AutoModelForCausalLM

    res["hf_meta"] = {}
    for fx in ("qwen3_moe", "mixtral", "deepseek_v3"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(FIXTURES / fx), dtype=torch.float32)
        loaded = load_sharded(FIXTURES / fx, mesh, target=model)
        res["hf_meta"][fx] = sorted(loaded) == sorted(model.state_dict()) and all(v.dtype == torch.float32 for v in loaded.values())
    return res


def _job(job: dict, rank: int, world: int, out: Path, meshes: dict) -> dict:
    from automodel_convert.parallel import build_mesh, load_sharded, save_sharded

    fixture, ep = job["fixture"], job["ep"]
    (out / job["name"]).mkdir(exist_ok=True)
    folder = Path(job.get("src") or FIXTURES / fixture)
    key = (ep, job.get("dp_shard"), job.get("dp_replicate"))
    if key not in meshes:
        meshes[key] = build_mesh(ep=ep, dp_shard=job.get("dp_shard"), dp_replicate=job.get("dp_replicate"))
    mesh = meshes[key]
    if job.get("kind") == "mesh":
        return _mesh_job(mesh)
    if job.get("kind") == "target":
        return _target_job(job, mesh)
    if job.get("kind") == "overwrite":
        return _overwrite_job(job, mesh, out / job["name"] / "dst")
    dense, expert_dp = job.get("dense", "replicate"), job.get("expert_dp", "replicate")
    state = load_sharded(folder, mesh, dense=dense, expert_dp=expert_dp)
    res = {"ep_rank": mesh.ep_rank, "stats": {k: v for k, v in vars(state.stats).items() if k != "experts"}}
    res["errors"] = _check_state(fixture, folder, state, mesh, ep, dense, expert_dp)
    for layout in job.get("save", ("original", "fused")):
        save_sharded(state, out / job["name"] / layout, mesh, layout=layout, max_shard_size=job.get("max_shard_size", "5GB"))
    return res


def _worker(rank: int, world: int, jobs: list[dict], out: str, fault: dict | None) -> dict:
    init_gloo(timeout_s=60)
    out_dir = Path(out)
    results: dict[str, dict] = {}
    meshes: dict = {}
    if fault is not None:
        from automodel_convert.parallel import save as save_mod

        def hook(stage: str, r: int) -> None:
            if stage == fault["stage"] and r == fault["rank"]:
                if fault["how"] == "exit":
                    os._exit(3)
                raise OSError(28, "No space left on device (injected)")

        save_mod._fault_hook = hook
    for job in jobs:
        try:
            results[job["name"]] = _job(job, rank, world, out_dir, meshes)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            results[job["name"]] = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    return json.loads(json.dumps(results))  # plain data only


def run_world(world: int, jobs: list[dict], out: Path, fault: dict | None = None) -> tuple[list[dict | None], list[int]]:
    """Spawn `world` gloo ranks running `jobs`; returns each rank's report (None if it died) and exit codes."""
    out.mkdir(parents=True, exist_ok=True)
    outcomes = spawn_ranks(_worker, world, jobs, str(out), fault, timeout_s=WORLD_TIMEOUT)
    return [o.result if o.exitcode == 0 else None for o in outcomes], [o.exitcode for o in outcomes]


def available() -> list[str]:
    return [f for f in FAMILIES if missing_reason(f) is None]


def _same_files(a: Path, b: Path) -> list[str]:
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    if names_a != names_b:
        return [f"files differ: {names_a} vs {names_b}"]
    return [n for n in names_a if _file_content(a / n) != _file_content(b / n)]


def _file_content(path: Path) -> bytes | dict:
    """A file's bytes; for the sidecar its fields except `checksums`, which api.merge records (of the source
    tensors it read) and save_sharded, writing from memory, does not."""
    if path.name != "automodel_convert.json":
        return path.read_bytes()
    sidecar = json.loads(path.read_text())
    sidecar.pop("checksums", None)
    return sidecar


def _check_job(world: int, name: str, fixture: str, out: Path, reports: list, merged: dict, ep: int, src: Path) -> None:
    for r, rep in enumerate(reports):
        assert rep is not None, f"rank {r} wrote no report"
        res = rep[name]
        assert "exception" not in res, f"rank {r}: {res.get('traceback')}"
        assert res["errors"] == [], f"rank {r}: {res['errors'][:5]}"
        ref, _ = reference_fused(fixture, FIXTURES / fixture)
        E = next(v.shape[0] for k, v in ref.items() if ".experts." in k)
        want = expected_bytes(src, {"E": E}, ep, res["ep_rank"])
        assert res["stats"]["bytes_read"] == want, f"rank {r} read {res['stats']['bytes_read']} bytes, expected {want}"
    # the source checkpoint bit for bit, and api.merge's output bit for bit
    assert _same_files(out / name / "original", FIXTURES / fixture) == []
    assert _same_files(out / name / "fused", merged[fixture]) == []
