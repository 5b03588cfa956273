"""Conversion you can trust (issue 15): no silent wrong output, no data loss, crashes become one-line errors.

Each test reproduces one finding of the issue against an independent reference: the original bytes, the
`safetensors` library, or `torch` itself. Faults are injected deterministically by wrapping functions the engine
calls (no sleeps, no races); real signals are sent by the process to itself from such a wrapper.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import folder_bytes, leftovers, write_raw_safetensors

E, H, I, LAYERS = 4, 16, 8, 2


def make_qwen3_moe(folder: Path, *, experts: int = E, hidden: int = H, inter: int = I, shards: int = 2) -> Path:
    """A tiny per-expert qwen3_moe checkpoint (hub key names), written with the safetensors library."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, hidden, generator=g).bfloat16()}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.mlp"
        tensors[f"{p}.gate.weight"] = torch.randn(experts, hidden, generator=g).bfloat16()
        for e in range(experts):
            tensors[f"{p}.experts.{e}.gate_proj.weight"] = torch.randn(inter, hidden, generator=g).bfloat16()
            tensors[f"{p}.experts.{e}.up_proj.weight"] = torch.randn(inter, hidden, generator=g).bfloat16()
            tensors[f"{p}.experts.{e}.down_proj.weight"] = torch.randn(hidden, inter, generator=g).bfloat16()
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s * per : (s + 1) * per]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "moe_intermediate_size": inter,
        "num_experts": experts,
        "num_hidden_layers": LAYERS,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(p))
    return out


def run_cli_subprocess(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, after `prelude` (Python code that installs a fault)."""
    code = prelude + "\nimport sys\nfrom automodel_convert.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_qwen3_moe(tmp_path_factory.mktemp("trust") / "ckpt")


@pytest.fixture
def src(base, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(base, dst)
    return dst


@pytest.fixture(scope="module")
def merged_base(base, tmp_path_factory) -> Path:
    from automodel_convert.convert import merge

    out = tmp_path_factory.mktemp("trust-merged") / "merged"
    merge(base, out)
    return out


@pytest.fixture
def merged(merged_base, tmp_path) -> Path:
    dst = tmp_path / "merged"
    shutil.copytree(merged_base, dst)
    return dst


def read_sidecar(folder: Path) -> dict:
    return json.loads((folder / "automodel_convert.json").read_text())


def _write_sidecar(folder: Path, sidecar: dict) -> None:
    (folder / "automodel_convert.json").write_text(json.dumps(sidecar))


# ---------------------------------------------------------------- item 2: split trusts the sidecar


@pytest.mark.parametrize(
    "name", ["../escape.safetensors", "/ABS/victim.txt", "sub/x.safetensors", "config.json", ".hidden.safetensors"]
)
def test_split_refuses_sidecar_shard_names_outside_destination(run_cli, merged, tmp_path, name):
    victim = tmp_path / "victim" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    name = name.replace("/ABS/", str(victim.parent) + "/")
    sidecar = read_sidecar(merged)
    sidecar["original"]["files"][0]["name"] = name
    _write_sidecar(merged, sidecar)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "automodel_convert.json")
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "escape.safetensors").exists()


def test_split_refuses_duplicate_sidecar_shard_names(run_cli, merged, tmp_path):
    sidecar = read_sidecar(merged)
    files = sidecar["original"]["files"]
    files[1]["name"] = files[0]["name"]
    _write_sidecar(merged, sidecar)
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "twice")
    assert leftovers(tmp_path, "out") == []


def test_split_refuses_hand_edited_parts(run_cli, merged, tmp_path):
    sidecar = read_sidecar(merged)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert sidecar["parts"][key] == [[I, H], [I, H]]
    sidecar["parts"][key] = [[I // 2, H * 2], [I, H]]  # same byte count, wrong shapes
    _write_sidecar(merged, sidecar)
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "parts")
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize(
    "field,value", [("layout", "sideways"), ("original_layout", 7), ("original", [1]), ("parts", {"x": "y"})]
)
def test_split_refuses_malformed_sidecar_fields(run_cli, merged, tmp_path, field, value):
    sidecar = read_sidecar(merged)
    sidecar[field] = value
    _write_sidecar(merged, sidecar)
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err)
    assert leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------- item 3: destination that contains the source


def test_overwrite_onto_ancestor_of_source_refused(run_cli, base, tmp_path):
    parent = tmp_path / "a" / "p"
    shutil.copytree(base, parent / "src")
    (parent / "notes.txt").write_text("mine")
    before = folder_bytes(parent / "src")
    code, _, err = run_cli("merge", parent / "src", parent, "--overwrite", "-q")
    assert code == 2
    one_line_error(err, "contains the source")
    assert folder_bytes(parent / "src") == before and (parent / "notes.txt").read_text() == "mine"
    code, _, err = run_cli("merge", parent / "src", parent, "--overwrite", "--force", "-q")
    assert code == 2  # --force never allows it
    assert folder_bytes(parent / "src") == before


def test_overwrite_replaces_only_checkpoint_folders(run_cli, src, merged, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli("merge", src, other, "--overwrite", "-q")
    assert code == 2
    one_line_error(err, "--force")
    assert sorted(os.listdir(other)) == ["notes.txt"]
    code, _, err = run_cli("merge", src, other, "--overwrite", "--force", "-q")
    assert code == 0, err
    assert not (other / "notes.txt").exists() and (other / "automodel_convert.json").exists()
    # a checkpoint folder (written by us) is replaced with --overwrite alone, but not with a stranger's file in it
    (merged / "notes.txt").write_text("mine")
    code, _, err = run_cli("merge", src, merged, "--overwrite", "-q")
    assert code == 2 and "--force" in err and (merged / "notes.txt").exists()
    (merged / "notes.txt").unlink()
    code, _, err = run_cli("merge", src, merged, "--overwrite", "-q")
    assert code == 0, err
    assert leftovers(tmp_path, "merged") == ["merged"] and leftovers(tmp_path, "other") == ["other"]


def test_destination_dot_with_overwrite(run_cli, src, tmp_path, monkeypatch):
    monkeypatch.chdir(src)
    code, _, err = run_cli("merge", src, ".", "--overwrite", "-q")
    assert code == 2
    one_line_error(err)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli("merge", src, ".", "--overwrite", "-q")
    assert code == 2
    one_line_error(err, "current folder")


# ---------------------------------------------------------------- item 4: a destination that appears mid-run


def _inject_on_first_copy(monkeypatch, action) -> None:
    import automodel_convert.convert.engine as engine

    real = engine.copy_range
    state = {"done": False}

    def hooked(*a, **k):
        if not state["done"]:
            state["done"] = True
            action()
        return real(*a, **k)

    monkeypatch.setattr(engine, "copy_range", hooked)


def test_destination_created_during_run_is_kept(run_cli, src, tmp_path, monkeypatch):
    dst = tmp_path / "out"

    def someone_else_writes():
        dst.mkdir()
        (dst / "notes.txt").write_text("theirs")

    _inject_on_first_copy(monkeypatch, someone_else_writes)
    code, _, err = run_cli("merge", src, dst, "-q", "--workers", "1")
    assert code == 2
    one_line_error(err, "appeared")
    assert sorted(os.listdir(dst)) == ["notes.txt"] and (dst / "notes.txt").read_text() == "theirs"
    assert leftovers(tmp_path, "out") == ["out"]


def test_second_writer_to_same_destination_is_refused(src, merged_base, tmp_path, monkeypatch):
    from automodel_convert.convert import ConvertError, merge

    dst = tmp_path / "out"
    errors: list[str] = []

    def second_merge():
        try:
            merge(src, dst, overwrite=True, workers=1)
        except ConvertError as e:
            errors.append(str(e))

    _inject_on_first_copy(monkeypatch, second_merge)
    merge(src, dst, workers=1)
    assert len(errors) == 1 and "another" in errors[0], errors
    assert folder_bytes(dst) == folder_bytes(merged_base)
    assert leftovers(tmp_path, "out") == ["out"]


# ---------------------------------------------------------------- item 5: crash-safe --overwrite


_SIGTERM_AT_COMMIT = """
import os, signal
import automodel_convert.convert.destination as d
real = d.{fn}
def hooked(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
d.{fn} = hooked
{extra}
"""


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_sigterm_during_overwrite_commit(merged, src, tmp_path, mode):
    """SIGTERM arrives inside the final step: the destination is then the complete new checkpoint, no `.old-*` or
    partial folder is left, and the message says so (it never claims nothing was written)."""
    (src / "generation_config.json").write_text('{"new": true}')  # so that the new output differs from the old
    prelude = _SIGTERM_AT_COMMIT.format(fn="commit_rename", extra="d._renameat2 = None" if mode == "fallback" else "")
    proc = run_cli_subprocess(["merge", src, merged, "--overwrite", "-q"], prelude)
    assert proc.returncode == 130, proc.stderr
    assert "complete" in proc.stderr and "nothing was written" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (merged / "generation_config.json").read_text() == '{"new": true}'
    assert {k: v.view(torch.int16) for k, v in all_tensors(merged).items()}.keys() == set(all_tensors(merged))
    assert read_sidecar(merged)["checksums"]["tensors"].keys() == {
        k for p in src.glob("*.safetensors") for k in load_file(p)
    }
    assert leftovers(tmp_path, "merged") == ["merged"]


def test_failed_fallback_commit_restores_old_destination(merged, src, tmp_path, monkeypatch):
    """Without renameat2: if moving the new folder into place fails after the old one was moved aside, the old one
    is put back and the message says the destination is unchanged."""
    import automodel_convert.convert.destination as d
    from automodel_convert.convert import ConvertError, merge

    before = folder_bytes(merged)
    monkeypatch.setattr(d, "_renameat2", None)
    real = d.commit_rename
    calls = {"n": 0}

    def second_fails(a, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(d, "commit_rename", second_fails)
    with pytest.raises(ConvertError, match="unchanged"):
        merge(src, merged, overwrite=True)
    assert folder_bytes(merged) == before
    assert leftovers(tmp_path, "merged") == ["merged"]


def test_stale_partial_of_dead_process_is_cleaned(run_cli, src, tmp_path):
    pid = _dead_pid()
    stale = tmp_path / f".out.partial-{pid}-deadbeef"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out.partial-{os.getpid()}-cafecafe"  # a live writer's staging folder is left alone
    live.mkdir()
    code, out, err = run_cli("merge", src, tmp_path / "out")
    assert code == 0, err
    assert not stale.exists() and live.exists()
    assert "stale" in out + err
    shutil.rmtree(live)
    assert leftovers(tmp_path, "out") == ["out"]


def _dead_pid() -> int:
    return int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )


def test_old_destination_of_killed_fallback_overwrite_is_restored(run_cli, src, merged, tmp_path):
    """A fallback --overwrite killed (SIGKILL) between its two renames leaves the old checkpoint in `.merged.old-*`
    and no destination: the next run puts it back before anything else, and says so."""
    old_bytes = folder_bytes(merged)
    aside = tmp_path / f".merged.old-{_dead_pid()}-0badf00d"
    merged.rename(aside)
    code, out, err = run_cli("merge", src, merged)
    assert code == 2 and "exists" in err  # restored first, so without --overwrite it is not replaced
    assert folder_bytes(merged) == old_bytes and not aside.exists()
    merged.rename(aside)
    code, out, err = run_cli("merge", src, merged, "--overwrite")
    assert code == 0, err
    assert "restored" in out and leftovers(tmp_path, "merged") == ["merged"]


def test_signal_right_after_staging_is_made_leaves_nothing(src, tmp_path, monkeypatch):
    import automodel_convert.convert.staging as staging
    from automodel_convert.convert import merge

    real = staging._make_staging

    def made_then_interrupted(staging, dst):
        real(staging, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(staging, "_make_staging", made_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(src, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------- item 6: a source rewritten during the run


def test_source_rewritten_during_run_is_detected(run_cli, src, tmp_path, monkeypatch):
    shard = src / "model-00002-of-00002.safetensors"

    def rewrite():
        tensors = load_file(shard)
        save_file({k: v + 1 for k, v in tensors.items()}, shard.with_suffix(".tmp"), metadata={"format": "pt"})
        os.replace(shard.with_suffix(".tmp"), shard)

    _inject_on_first_copy(monkeypatch, rewrite)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q", "--workers", "1")
    assert code == 2
    one_line_error(err, "changed")
    assert leftovers(tmp_path, "out") == []


def test_source_rewritten_in_place_is_detected(run_cli, src, tmp_path, monkeypatch):
    shard = src / "model-00001-of-00002.safetensors"

    def rewrite_in_place():
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        with open(shard, "r+b") as f:  # same inode, same size
            f.write(data)
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    _inject_on_first_copy(monkeypatch, rewrite_in_place)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q", "--workers", "1")
    assert code == 2
    one_line_error(err, "changed")


# ---------------------------------------------------------------- item 7: checksums


def test_merge_records_checksums_of_every_source_tensor(src, merged_base):
    import hashlib

    import xxhash

    sums = read_sidecar(merged_base)["checksums"]
    assert sums["algorithm"] in ("xxh3_128", "sha256")
    reference = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():  # noqa: SIM118
                raw = f.get_tensor(k).view(torch.uint8).numpy().tobytes()
                h = xxhash.xxh3_128(raw) if sums["algorithm"] == "xxh3_128" else hashlib.sha256(raw)
                reference[k] = h.hexdigest()
    assert sums["tensors"] == reference


def _flip_bit_in_expert(folder: Path) -> None:
    shard = next(
        p for p in sorted(folder.glob("*.safetensors")) if "experts.gate_up_proj" in str(safe_open(p, "pt").keys())
    )
    with safe_open(shard, "pt") as f:
        keys = list(f.keys())
    from automodel_convert.convert.safetensors_io import read_header

    info = next(t for t in read_header(shard).tensors if t.name.endswith("experts.gate_up_proj"))
    data = bytearray(shard.read_bytes())
    data[info.start + 3] ^= 0x10
    shard.write_bytes(bytes(data))
    assert keys


def test_verify_merged_detects_flipped_bit(run_cli, merged):
    code, out, _ = run_cli("verify", merged)
    assert code == 0 and "checksum" in out
    _flip_bit_in_expert(merged)
    code, out, err = run_cli("verify", merged)
    assert code == 1, out + err
    assert "MISMATCH" in out and "checksum" in out


def test_split_checks_output_against_checksums(run_cli, merged, tmp_path):
    _flip_bit_in_expert(merged)
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "checksum")
    assert leftovers(tmp_path, "out") == []


def test_split_of_intact_merge_is_byte_identical(run_cli, src, merged, tmp_path):
    code, _, err = run_cli("split", merged, tmp_path / "out", "-q")
    assert code == 0, err
    assert folder_bytes(tmp_path / "out") == folder_bytes(src)


# ---------------------------------------------------------------- item 8: --dequantize on an unquantized source


def test_dequantize_unquantized_is_refused(run_cli, src, tmp_path):
    code, _, err = run_cli("merge", src, tmp_path / "out", "--dequantize", "bf16", "-q")
    assert code == 2
    one_line_error(err, "not quantized")
    assert leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------- item 1: orientation of already-fused checkpoints


def _vl_checkpoint(
    folder: Path, *, hidden: int, inter: int, transposed: bool, experts: int = 3
) -> dict[str, torch.Tensor]:
    """A minimal qwen3_vl_moe checkpoint: returns the fused tensors in transformers' in-memory layout."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    model = {}
    disk = {}
    for layer in range(2):
        p = f"model.language_model.layers.{layer}.mlp.experts"
        gate_up = torch.randn(experts, 2 * inter, hidden, generator=g).bfloat16()
        down = torch.randn(experts, hidden, inter, generator=g).bfloat16()
        model[f"{p}.gate_up_proj"], model[f"{p}.down_proj"] = gate_up, down
        disk[f"{p}.gate_up_proj"] = gate_up.transpose(1, 2).contiguous() if transposed else gate_up
        disk[f"{p}.down_proj"] = down.transpose(1, 2).contiguous() if transposed else down
    disk["model.language_model.embed_tokens.weight"] = torch.randn(8, hidden, generator=g).bfloat16()
    save_file(disk, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = {
        "model_type": "qwen3_vl_moe",
        "text_config": {"hidden_size": hidden, "moe_intermediate_size": inter, "num_experts": experts},
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("transposed", [False, True], ids=["saved-by-transformers", "hub-transposed"])
def test_fused_orientation_detected_from_shapes(run_cli, tmp_path, transposed):
    model = _vl_checkpoint(tmp_path / "src", hidden=40, inter=12, transposed=transposed)
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q")
    assert code == 0, err
    got = all_tensors(tmp_path / "out")
    for k, v in model.items():
        assert torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k
    code, _, err = run_cli("split", tmp_path / "out", tmp_path / "back", "-q")
    assert code == 0, err
    assert folder_bytes(tmp_path / "back")["model.safetensors"] == folder_bytes(tmp_path / "src")["model.safetensors"]
    from automodel_convert.convert import inspect

    info = inspect(tmp_path / "src")
    assert info["layout"] == ("transposed" if transposed else "fused")
    assert {g["fused"].rsplit(".", 1)[-1]: g["part_shapes"][0] for g in info["groups"]} == {
        "gate_up_proj": [12, 40],
        "down_proj": [40, 12],
    }


@pytest.mark.parametrize("transposed", [True, False], ids=["hub", "transformers"])
def test_square_gate_up_is_decided_by_down(run_cli, tmp_path, transposed):
    """2I == H: gate_up [2I, H] is square, but down [H, I] vs [I, H] is not, so the checkpoint as a whole fits one
    orientation (a tensor alone that fits both is refused: tests/test_orientation.py). --source-layout naming the
    other orientation is refused in one line."""
    model = _vl_checkpoint(tmp_path / "src", hidden=24, inter=12, transposed=transposed)
    wrong = "fused" if transposed else "transposed"
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q", "--source-layout", wrong)
    assert code == 2
    one_line_error(err, "does not fit")
    assert leftovers(tmp_path, "out") == []
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q")
    assert code == 0, err
    got = all_tensors(tmp_path / "out")
    for k, v in model.items():
        assert torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k


@pytest.mark.parametrize("transposed", [True, False], ids=["hub", "transformers"])
def test_square_down_projection_is_decided_by_gate_up(run_cli, tmp_path, transposed):
    """I == H: the down projection [H, I] is square, but gate_up [2I, H] vs [H, 2I] is not: no flag needed."""
    model = _vl_checkpoint(tmp_path / "src", hidden=16, inter=16, transposed=transposed)
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q")
    assert code == 0, err
    got = all_tensors(tmp_path / "out")
    for k, v in model.items():
        assert torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k


def test_source_layout_that_does_not_fit_is_refused(run_cli, tmp_path):
    _vl_checkpoint(tmp_path / "src", hidden=40, inter=12, transposed=True)
    code, _, err = run_cli("merge", tmp_path / "src", tmp_path / "out", "-q", "--source-layout", "fused")
    assert code == 2
    one_line_error(err, "fused")


# ---------------------------------------------------------------- crashes and leftovers


def test_failing_extra_file_copy_is_one_line(run_cli, src, tmp_path, monkeypatch):
    import errno

    import automodel_convert.convert.staging as staging

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging, "copy_extra_file", full)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "no space")
    assert leftovers(tmp_path, "out") == []


def test_unreadable_extra_file_is_a_source_problem(run_cli, src, tmp_path, monkeypatch):
    import errno

    import automodel_convert.convert.staging as staging

    real = staging.copy_extra_file

    def unreadable(s, d):
        if Path(s).name == "tokenizer.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(s))
        return real(s, d)

    monkeypatch.setattr(staging, "copy_extra_file", unreadable)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "tokenizer.json", "source")
    assert leftovers(tmp_path, "out") == []


def test_huge_num_experts_is_bounded_by_tensors(run_cli, src, tmp_path):
    import resource

    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts"] = 10**9
    (src / "config.json").write_text(json.dumps(cfg))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "num_experts")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no 10^9-long lists


def test_lone_surrogate_tensor_name_is_refused(run_cli, src, tmp_path):
    for p in src.glob("*.safetensors"):
        p.unlink()
    (src / "model.safetensors.index.json").unlink()
    raw = b'{"a\\udc80":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    raw += b" " * (-len(raw) % 8)
    (src / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0")
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "UTF-8")


@pytest.mark.parametrize("size", ["1e400GB", "nan", "inf", "-0", "1e-30B"])
def test_absurd_max_shard_size(run_cli, src, tmp_path, size):
    code, _, err = run_cli("merge", src, tmp_path / "out", "--max-shard-size", size, "-q")
    assert code == 2
    one_line_error(err, "--max-shard-size")


def test_usage_error_is_one_line(run_cli, src, tmp_path):
    code, _, err = run_cli("merge", src, tmp_path / "out", "--no-such-flag")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--no-such-flag" in lines[0], err


def test_ctrl_c_during_imports_is_one_line():
    code = (
        "import builtins, sys\nreal = builtins.__import__\n"
        "def imp(name, *a, **k):\n    if name == 'typer':\n        raise KeyboardInterrupt\n    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\nfrom automodel_convert.cli import console_main\nconsole_main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130
    assert len(proc.stderr.strip().splitlines()) == 1 and "interrupted" in proc.stderr, proc.stderr


def test_long_destination_name(run_cli, src, tmp_path):
    dst = tmp_path / ("d" * 240)
    code, _, err = run_cli("merge", src, dst, "-q")
    assert code == 0, err
    assert (dst / "automodel_convert.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", dst.name])


def test_output_keeps_source_permissions(run_cli, src, tmp_path):
    for p in src.iterdir():
        p.chmod(0o640)
    src.chmod(0o750)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 0, err
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o640 for p in out.iterdir()}


def test_source_read_error_is_reported_as_source_problem(run_cli, src, tmp_path, monkeypatch):
    import errno

    import automodel_convert.convert.sources as sources

    def eio(fd, view, off):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sources, "_source_preadv", eio)
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "source")
    assert "destination" not in err
    assert leftovers(tmp_path, "out") == []


def test_output_is_fsynced_before_rename(src, tmp_path, monkeypatch):
    import automodel_convert.convert.destination as d
    import automodel_convert.convert.engine as engine
    from automodel_convert.convert import merge

    events: list[str] = []
    real_fsync, real_rename = os.fsync, d.commit_rename
    monkeypatch.setattr(engine.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(d, "commit_rename", lambda *a: (events.append("rename"), real_rename(*a))[1])
    merge(src, tmp_path / "out")
    n_files = len(list((tmp_path / "out").iterdir()))
    assert events.index("rename") >= n_files and set(events[: events.index("rename")]) == {"fsync"}


@pytest.mark.parametrize(
    "entry,why",
    [
        ({"dtype": "U8", "shape": ["4"], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "U8", "shape": [4], "data_offsets": ["0", "4"]}, "offsets"),
        ({"dtype": "U8", "shape": [True, 4], "data_offsets": [0, 4]}, "shape"),
    ],
)
def test_malformed_header_values_refused_like_safetensors(run_cli, src, tmp_path, entry, why):
    shard = src / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    shard.unlink()
    (src / "model.safetensors.index.json").unlink()
    write_raw_safetensors(src / "bad.safetensors", {"bad": entry}, b"\0" * 4)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the reference refuses it, whatever its exception type
        safe_open(src / "bad.safetensors", "pt").get_tensor("bad")
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2 and tensors
    one_line_error(err, why)


def test_trailing_junk_refused_like_safetensors(run_cli, src, tmp_path):
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes() + b"junk-junk")
    with pytest.raises(Exception):  # noqa: B017, PT011
        safe_open(shard, "pt")
    code, _, err = run_cli("merge", src, tmp_path / "out", "-q")
    assert code == 2
    one_line_error(err, "trailing")
