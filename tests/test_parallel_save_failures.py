"""Expert-parallel save on spawned gloo ranks when a rank fails: a rank that raises or dies during a save leaves
nothing that looks like a checkpoint, and a dead writer's staging folder is removed by the next save."""

from __future__ import annotations

from pathlib import Path

from parallel_worlds import (
    run_world,
)

# ---------------------------------------------------------------- failures during save


def _looks_complete(folder: Path) -> bool:
    return folder.exists() and (folder / "model.safetensors.index.json").exists()


def test_rank_error_during_save_leaves_nothing(tmp_path):
    """A rank whose writes fail (an exception): every rank raises, no dst, no staging folder."""
    jobs = [{"name": "qwen3_moe", "fixture": "qwen3_moe", "ep": 2, "save": ("fused",)}]
    reports, codes = run_world(2, jobs, tmp_path, fault={"stage": "written", "rank": 1, "how": "raise"})
    assert codes == [0, 0]
    for rep in reports:
        assert "No space left on device (injected)" in rep["qwen3_moe"]["exception"]
    assert list((tmp_path / "qwen3_moe").iterdir()) == []  # no dst, no staging folder


def test_rank_killed_during_write_leaves_no_checkpoint(tmp_path):
    """Rank 1 dies after its first write: rank 0's collective fails, it removes the staging folder, no dst."""
    jobs = [{"name": "qwen3_moe", "fixture": "qwen3_moe", "ep": 2, "save": ("fused",)}]
    reports, codes = run_world(2, jobs, tmp_path, fault={"stage": "written", "rank": 1, "how": "exit"})
    assert codes[1] == 3 and reports[1] is None
    assert "exception" in reports[0]["qwen3_moe"]
    parent = tmp_path / "qwen3_moe"
    assert not (parent / "fused").exists()
    assert list(parent.iterdir()) == []  # no dst, no staging folder


def test_rank0_killed_before_publish_then_next_save_cleans(tmp_path):
    """Rank 0 dies after every byte is written but before the index: dst never appears; the staging folder is
    recognisable (`.fused.partial-<pid>-*`, no index) and the next save removes it and succeeds."""
    jobs = [{"name": "qwen3_moe", "fixture": "qwen3_moe", "ep": 2, "save": ("fused",)}]
    reports, codes = run_world(2, jobs, tmp_path, fault={"stage": "gathered", "rank": 0, "how": "exit"})
    assert codes[0] == 3
    parent = tmp_path / "qwen3_moe"
    assert not (parent / "fused").exists()
    partial = [p for p in parent.iterdir() if p.name.startswith(".fused.partial-")]
    assert len(partial) == 1 and not (partial[0] / "model.safetensors.index.json").exists()
    assert list(partial[0].glob("*.safetensors"))  # the written shards are there, unpublished
    # the next save (a new world) into the same dst removes the dead writer's staging folder and publishes
    reports, codes = run_world(1, [dict(jobs[0], ep=1)], tmp_path)
    assert codes == [0], reports
    assert "exception" not in reports[0]["qwen3_moe"], reports[0]["qwen3_moe"].get("traceback")
    assert [p.name for p in parent.iterdir()] == ["fused"]
    assert _looks_complete(parent / "fused")
