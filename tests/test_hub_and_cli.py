"""Hub sources from a local huggingface_hub cache (HF_HUB_OFFLINE=1), dry runs, inspect, verify's exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import folder_bytes, leftovers
from test_bad_input import base_ckpt  # noqa: F401  (session fixture reused)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(base_ckpt, tmp_path, monkeypatch):  # noqa: F811
    """A hub cache laid out as huggingface_hub lays it out: blobs, a snapshot of symlinks, refs/main."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--acme--tiny-moe"
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    import hashlib

    for p in sorted(base_ckpt.iterdir()):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copy(p, repo / "blobs" / digest)
        (snap / p.name).symlink_to(Path("../../blobs") / digest)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return snap


def test_merge_from_hub_id_offline(hub_cache, tmp_path, run_cli):
    code, out, err = run_cli("merge", "acme/tiny-moe", tmp_path / "fused", "-q")
    assert code == 0, err
    code, out, err = run_cli("split", tmp_path / "fused", tmp_path / "back", "-q")
    assert code == 0, err
    original = {p.name: p.read_bytes() for p in hub_cache.iterdir()}
    assert folder_bytes(tmp_path / "back") == original


def test_hub_revision_by_commit(hub_cache, tmp_path, run_cli):
    code, _, err = run_cli("inspect", "acme/tiny-moe", "--revision", COMMIT, "--json")
    assert code == 0, err


def test_hub_repo_not_in_cache_offline(hub_cache, tmp_path, run_cli):
    code, _, err = run_cli("merge", "acme/absent-model", tmp_path / "out")
    assert code == 2 and "HF_HUB_OFFLINE" in err and len(err.strip().splitlines()) == 1
    assert leftovers(tmp_path, "out") == []


def test_dry_run_writes_nothing(base_ckpt, tmp_path, run_cli):  # noqa: F811
    for cmd in ("merge", "split"):
        code, out, err = run_cli(cmd, base_ckpt, tmp_path / "out", "--dry-run")
        assert code == 0, err
        assert "plan" in out and "gate_up_proj" in out and "output shards" in out
        assert leftovers(tmp_path, "out") == []


def test_inspect_json_and_ep(base_ckpt, run_cli):  # noqa: F811
    code, out, err = run_cli("inspect", base_ckpt, "--json", "--ep", "3")
    assert code == 0, err
    info = json.loads(out)
    assert info["model_type"] == "qwen3_moe" and info["layout"] == "per_expert"
    ranks = info["ep"]["ranks"]
    # 4 experts over 3 ranks, torch.chunk rule: 2, 2, 0
    assert [r["num_experts"] for r in ranks] == [2, 2, 0]
    assert sum(r["expert_bytes"] for r in ranks) == info["expert_bytes"]
    assert all(r["bytes_read"] == r["expert_bytes"] + info["non_expert_bytes"] for r in ranks)


def test_verify_ok_and_mismatch_exit_codes(base_ckpt, run_cli, monkeypatch):  # noqa: F811
    code, out, _ = run_cli("verify", base_ckpt)
    assert code == 0 and "bit-exact" in out
    # break the inverse of the gate|up concatenation: verify must notice and exit 1
    from automodel_convert.convert import ops

    monkeypatch.setattr(ops.Chunk, "apply", lambda self, xs: list(reversed(xs[0].split(list(self.sizes), dim=self.dim))))
    monkeypatch.setattr(ops.Chunk, "is_byte_concat", lambda self: False)
    code, out, _ = run_cli("verify", base_ckpt)
    assert code == 1 and "MISMATCH" in out


def test_model_type_override_for_wrapper(base_ckpt, tmp_path, run_cli):  # noqa: F811
    """A remote-code wrapper whose config names an unknown type: --model-type maps its language model."""
    src = tmp_path / "wrapped"
    shutil.copytree(base_ckpt, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "acme_wrapper"
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli("merge", src, tmp_path / "f", "-q")
    assert code == 2 and "--model-type" in err
    code, _, err = run_cli("merge", src, tmp_path / "f", "-q", "--model-type", "qwen3_moe")
    assert code == 0, err
    code, _, err = run_cli("split", tmp_path / "f", tmp_path / "b", "-q", "--model-type", "qwen3_moe")
    assert code == 0, err
    assert folder_bytes(tmp_path / "b") == folder_bytes(src)
