"""Expert-parallel load/save on spawned gloo ranks (world 1-4, uneven experts, ep x dp) against independent references.

Every local shard must equal the matching slice of the full tensor computed here from `safetensors.torch.load_file`
with `torch.stack`/`torch.cat` (not through the planner); bytes read per rank must equal the expert share plus the
non-expert bytes (and `api.inspect`'s prediction); `save_sharded` must write the source checkpoint bit for bit
(`layout="original"`) and `api.merge`'s output bit for bit (`layout="fused"`) (a rank that fails or dies during a
save: `test_parallel_save_failures.py`). One spawn per world size runs every family; the tests read
its per-rank reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from parallel_worlds import (
    FAMILIES,
    _check_job,
    _same_files,
    available,
    expected_bytes,
    missing_reason,
    reference_fused,
    run_world,
)

from automodel_convert.convert import api

from conftest import FIXTURES


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, Path]:
    """`api.merge` of every available fixture: the fused reference, and a fused SOURCE for load_sharded."""
    root = tmp_path_factory.mktemp("merged")
    return {f: Path(api.merge(FIXTURES / f, root / f).dst) for f in available()}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, merged):
    """world size -> (out folder, per-rank reports), spawned on first use."""
    cache: dict[int, tuple[Path, list]] = {}

    def get(world: int) -> tuple[Path, list]:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"world{world}")
            jobs = [{"name": f, "fixture": f, "ep": world} for f in available()]
            if "qwen3_moe" in available():  # a fused source (merge output with sidecar): original = the hub files
                jobs.append({"name": "qwen3_moe@fused", "fixture": "qwen3_moe", "src": str(merged["qwen3_moe"]), "ep": world})
            reports, codes = run_world(world, jobs, out)
            assert codes == [0] * world, f"ranks exited with {codes}"
            cache[world] = (out, reports)
        return cache[world]

    return get


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("fixture", list(FAMILIES))
def test_load_save_roundtrip(world, fixture, worlds, merged):
    reason = missing_reason(fixture)
    if reason:
        pytest.skip(reason)
    out, reports = worlds(world)
    _check_job(world, fixture, fixture, out, reports, merged, world, FIXTURES / fixture)


@pytest.mark.parametrize("world", [2, 3])
def test_fused_source_reads_contiguous_ranges(world, worlds, merged):
    if missing_reason("qwen3_moe"):
        pytest.skip(missing_reason("qwen3_moe"))
    out, reports = worlds(world)
    _check_job(world, "qwen3_moe@fused", "qwen3_moe", out, reports, merged, world, merged["qwen3_moe"])


def test_bytes_read_equal_inspect_prediction(worlds):
    """`automodel-convert inspect --ep N` predicts what each rank of load_sharded reads."""
    from automodel_convert.parallel import predict_read_bytes

    world = 3
    out, reports = worlds(world)
    checked = 0
    for fixture in available():
        info = api.inspect(FIXTURES / fixture, ep=world)
        predicted = predict_read_bytes(FIXTURES / fixture, world)
        for rep in reports:
            res = rep[fixture]
            got = res["stats"]["bytes_read"]
            assert got == predicted[res["ep_rank"]]
            if info["expert_bytes"]:  # inspect counts the planner's expert groups (not native expert tensors)
                assert got == info["ep"]["ranks"][res["ep_rank"]]["bytes_read"], fixture
                checked += 1
    assert checked


def test_ep_times_dp(tmp_path, merged):
    """World 4 = ep 2 x ep_dp 2: experts split in two, each half held by two ranks; with dp sharding too."""
    fams = [f for f in ("qwen3_moe", "deepseek_v3_fp8", "mixtral") if missing_reason(f) is None]
    jobs = [{"name": f, "fixture": f, "ep": 2, "dp_shard": 2} for f in fams]
    jobs += [
        {"name": f"{f}@shard", "fixture": f, "ep": 2, "dp_shard": 2, "dense": "shard", "expert_dp": "shard", "max_shard_size": "60KB"}
        for f in fams[:2]
    ]
    if missing_reason("qwen3_vl_moe") is None:  # transposed on disk: saving it computes whole experts (gathered)
        jobs.append({"name": "qwen3_vl_moe@shard", "fixture": "qwen3_vl_moe", "ep": 2, "dp_shard": 2, "dense": "shard", "expert_dp": "shard", "max_shard_size": "60KB"})
    reports, codes = run_world(4, jobs, tmp_path)
    assert codes == [0] * 4
    for job in jobs:
        f = job["fixture"]
        for r, rep in enumerate(reports):
            res = rep[job["name"]]
            assert "exception" not in res, f"rank {r}: {res.get('traceback')}"
            assert res["errors"] == [], f"rank {r} {job['name']}: {res['errors'][:5]}"
            if "dense" not in job:
                ref, _ = reference_fused(f, FIXTURES / f)
                E = next(v.shape[0] for k, v in ref.items() if ".experts." in k)
                assert res["stats"]["bytes_read"] == expected_bytes(FIXTURES / f, {"E": E}, 2, res["ep_rank"])
            else:  # each rank reads its box only: experts / 4 and dense / 2 give about a quarter to half
                assert res["stats"]["bytes_read"] < sum(p.stat().st_size for p in (FIXTURES / f).glob("*.safetensors")) / 2
        assert _same_files(tmp_path / job["name"] / "original", FIXTURES / f) == []
        if "max_shard_size" not in job:
            assert _same_files(tmp_path / job["name"] / "fused", merged[f]) == []
        else:
            ref_dir = tmp_path / f"{job['name']}-merge"
            api.merge(FIXTURES / f, ref_dir, max_shard_size=job["max_shard_size"])
            assert len(list(ref_dir.glob("*.safetensors"))) > 1
            assert _same_files(tmp_path / job["name"] / "fused", ref_dir) == []


def test_build_mesh_views_of_the_same_ranks(tmp_path):
    """build_mesh(ep=2, dp_shard=2) on 4 ranks: HSDP 2 x 2 over all ranks; ep groups {0,1} {2,3}, expert dp groups
    {0,2} {1,3}: every rank is a dp rank and an ep rank at once."""
    reports, codes = run_world(4, [{"name": "m", "fixture": "qwen3_moe", "ep": 2, "dp_shard": 2, "kind": "mesh"}], tmp_path)
    assert codes == [0] * 4
    for rep in reports:
        res = rep["m"]
        assert "exception" not in res, res.get("traceback")
        r = res["rank"]
        assert res["sizes"] == {"world": 4, "dp_replicate": 2, "dp_shard": 2, "ep": 2, "ep_dp": 2}
        assert res["groups"]["dp"] == [0, 1, 2, 3]
        assert res["groups"]["dp_shard"] == ([0, 1] if r < 2 else [2, 3])
        assert res["groups"]["dp_replicate"] == [r % 2, r % 2 + 2]
        assert res["groups"]["ep"] == ([0, 1] if r < 2 else [2, 3])
        assert res["groups"]["ep_dp"] == [r % 2, r % 2 + 2]
        assert res["local"] == {"rank": r, "dp": r, "dp_replicate": r // 2, "dp_shard": r % 2, "ep": r % 2, "ep_dp": r // 2}
        assert res["ep_dp_sum"] == float(r % 2 + r % 2 + 2)


def test_target_state_dict_and_overwrite(tmp_path):
    """A meta-device target fixes names, shapes and dtypes: casts bf16 -> float32, refuses missing names and
    wrong shapes, and with strict=False skips (does not read) checkpoint tensors the target lacks. Saving over an
    existing folder is refused on every rank unless overwrite=True."""
    if missing_reason("qwen3_moe"):
        pytest.skip(missing_reason("qwen3_moe"))
    jobs = [{"name": "t", "fixture": "qwen3_moe", "ep": 2, "kind": "target"}, {"name": "o", "fixture": "qwen3_moe", "ep": 2, "kind": "overwrite"}]
    reports, codes = run_world(2, jobs, tmp_path)
    assert codes == [0, 0]
    # save_sharded into an existing folder: refused on every rank; overwrite=True replaces it atomically
    for rep in reports:
        assert "exception" not in rep["o"], rep["o"].get("traceback")
        assert "exists; pass --overwrite" in rep["o"]["exists_error"]
    dst = tmp_path / "o" / "dst"
    assert json.loads((dst / "config.json").read_text())["note"] == "rewritten"
    assert _same_files(dst, FIXTURES / "qwen3_moe") == ["config.json"]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst"]
    for rep in reports:
        res = rep["t"]
        assert "exception" not in res, res.get("traceback")
        assert res["errors"] == []
        assert "1 checkpoint tensors are not in the target" in res["strict_error"] and "strict=False" in res["strict_error"]
        assert res["skipped"] == [res["dropped"]] and res["loose_bytes"] < res["full_bytes"]
        assert "the target expects [1, 2]" in res["shape_error"]
        assert res["hf_meta"] == {"qwen3_moe": True, "mixtral": True, "deepseek_v3": True}
