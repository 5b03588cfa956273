"""Bad input: each case exits 2 with one line that says what is wrong and how to fix it, and leaves nothing at DST."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import leftovers, write_raw_safetensors


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)
    path = tmp_path_factory.mktemp("base") / "ckpt"
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="30KB")
    return path


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(base_ckpt, dst)
    return dst


def _index(ckpt: Path) -> dict:
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def _write_index(ckpt: Path, index: dict) -> None:
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_of(ckpt: Path, key: str) -> Path:
    return ckpt / _index(ckpt)["weight_map"][key]


def _rewrite_shard(ckpt: Path, key: str, edit) -> None:
    """Load the shard holding `key`, let `edit(tensors)` change it, save it back and fix the index."""
    shard = _shard_of(ckpt, key)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = _index(ckpt)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    _write_index(ckpt, index)


def _assert_bad(run_cli, args, dst: Path, *needles: str) -> str:
    code, out, err = run_cli(*args)
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    assert leftovers(dst.parent, dst.name) == [] or dst.exists() and args[-1] != "--overwrite"
    return lines[0]


EXPERT = "model.layers.1.mlp.experts.2.gate_proj.weight"


def test_missing_source(run_cli, tmp_path):
    _assert_bad(run_cli, ["merge", tmp_path / "nope", tmp_path / "out"], tmp_path / "out", "does not exist")


def test_no_safetensors(run_cli, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "qwen3_moe"}')
    _assert_bad(run_cli, ["merge", tmp_path / "src", tmp_path / "out"], tmp_path / "out", "no .safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ.get("EVIL_MARK", "/tmp/evil-mark"))),))


def test_pickle_checkpoint_refused_never_unpickled(run_cli, tmp_path, monkeypatch):
    mark = tmp_path / "unpickled"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))
    line = _assert_bad(run_cli, ["merge", tmp_path / "src", tmp_path / "out"], tmp_path / "out", "pickle", "safetensors")
    assert "never unpickles" in line
    assert not mark.exists()


def test_truncated_shard(run_cli, ckpt, tmp_path):
    shard = _shard_of(ckpt, EXPERT)
    shard.write_bytes(shard.read_bytes()[:-100])
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", shard.name, "truncated")


def test_header_length_larger_than_file(run_cli, ckpt, tmp_path):
    shard = _shard_of(ckpt, EXPERT)
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(raw) * 10) + raw[8:])
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "header length", "larger than the file")


def _craft(ckpt: Path, header: dict, data: bytes) -> None:
    """Replace the checkpoint with one hand-written shard."""
    for p in ckpt.glob("*.safetensors*"):
        p.unlink()
    write_raw_safetensors(ckpt / "model.safetensors", header, data)


def test_offsets_outside_data_area(run_cli, ckpt, tmp_path):
    _craft(ckpt, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, b"\0" * 20)
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "'b'", "outside the data")


def test_overlapping_offsets(run_cli, ckpt, tmp_path):
    _craft(ckpt, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "overlap")


def test_size_disagrees_with_shape(run_cli, ckpt, tmp_path):
    _craft(ckpt, {"a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "corrupt")


def test_index_names_missing_shard(run_cli, ckpt, tmp_path):
    shard = _shard_of(ckpt, EXPERT)
    shard.unlink()
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", shard.name, "missing")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_escapes(run_cli, ckpt, tmp_path, bad):
    index = _index(ckpt)
    index["weight_map"][EXPERT] = bad
    _write_index(ckpt, index)
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "escapes the checkpoint folder")


def test_unknown_model_type_lists_supported(run_cli, ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "not_a_moe"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    line = _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "unknown model_type", "--model-type")
    assert "qwen3_moe" in line and "mixtral" in line


def test_missing_expert(run_cli, ckpt, tmp_path):
    _rewrite_shard(ckpt, EXPERT, lambda t: [t.pop(k) for k in list(t) if ".experts.2." in k and "layers.1." in k])
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "missing expert", "[2]")


def test_missing_part_of_an_expert(run_cli, ckpt, tmp_path):
    _rewrite_shard(ckpt, EXPERT, lambda t: t.pop(EXPERT))
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "expert 2 lacks", "gate_proj")


def test_duplicated_expert(run_cli, ckpt, tmp_path):
    _rewrite_shard(ckpt, EXPERT, lambda t: t.__setitem__(EXPERT.replace(".2.", ".02."), t[EXPERT].clone()))
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "expert 2 appears twice")


def test_experts_with_different_shapes(run_cli, ckpt, tmp_path):
    _rewrite_shard(ckpt, EXPERT, lambda t: t.__setitem__(EXPERT, t[EXPERT][:-1].clone()))
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "differ", EXPERT)


def test_experts_with_different_dtypes(run_cli, ckpt, tmp_path):
    _rewrite_shard(ckpt, EXPERT, lambda t: t.__setitem__(EXPERT, t[EXPERT].float()))
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out"], tmp_path / "out", "differ", "F32")


def test_destination_exists_without_overwrite(run_cli, ckpt, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = run_cli("merge", ckpt, dst)
    assert code == 2 and "--overwrite" in err
    assert (dst / "keep.txt").read_text() == "mine" and sorted(os.listdir(dst)) == ["keep.txt"]
    code, _, err = run_cli("merge", ckpt, dst, "--overwrite", "-q")  # not a checkpoint folder: needs --force
    assert code == 2 and "--force" in err and (dst / "keep.txt").read_text() == "mine"
    code, _, err = run_cli("merge", ckpt, dst, "--overwrite", "--force", "-q")
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors.index.json").exists()
    assert leftovers(tmp_path, "out") == ["out"]


def test_destination_not_writable(run_cli, ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli("merge", ckpt, blocker / "out")
    assert code == 2 and "error:" in err and len(err.strip().splitlines()) == 1
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        code, _, err = run_cli("merge", ckpt, ro / "out")
        assert code == 2 and "writable" in err
    code, _, err = run_cli("merge", ckpt, "/proc/automodel-convert-test-out")
    assert code == 2 and "error:" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fallocate", [True, False], ids=["fails-at-fallocate", "fails-midway"])
def test_disk_full_cleans_up(ckpt, tmp_path, fallocate):
    """A file-size limit makes the write fail (EFBIG, like ENOSPC): at the up-front fallocate, or midway through the
    copy where the filesystem has no fallocate: exit 2, one line, nothing left."""
    code = (
        "import resource, signal, sys;"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000));"
        + ("" if fallocate else "import automodel_convert.convert.engine as e; e._fallocate = None;")
        + "from automodel_convert.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run([sys.executable, "-c", code, "merge", str(ckpt), str(tmp_path / "out"), "--max-shard-size", "1GB"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "no space left" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert leftovers(tmp_path, "out") == []


def test_interrupt_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import automodel_convert.convert.engine as engine
    from automodel_convert.convert import merge

    calls = {"n": 0}
    real = engine.copy_range

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "copy_range", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge(ckpt, tmp_path / "out", workers=1)
    assert leftovers(tmp_path, "out") == []


def test_sigterm_leaves_nothing(ckpt, tmp_path):
    """SIGTERM mid-write (simulated inside the write) leaves no destination and no partial folder."""
    code = (
        "import os, signal, sys\n"
        "import automodel_convert.convert.engine as e\n"
        "real = e.copy_range\n"
        "def slow(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*a, **k)\n"
        "e.copy_range = slow\n"
        "from automodel_convert.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "merge", str(ckpt), str(tmp_path / "out"), "--workers", "1"], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert leftovers(tmp_path, "out") == []


_SIGNAL_STORM = """
import os, signal, sys, threading, time
import automodel_convert.convert.engine as e
real = e.copy_range
calls = []
def storm(*a, **k):
    calls.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGTERM)  # every piece, from every worker: signals keep arriving during clean-up
    time.sleep(0.001)
    return real(*a, **k)
e.copy_range = storm
from automodel_convert.cli import main
rc = main(sys.argv[1:])
n = len(calls)
time.sleep(0.2)
print(f"threads={threading.active_count()} late_calls={len(calls) - n}")
sys.exit(rc)
"""


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_storm_stops_every_worker_before_clean_up(ckpt, tmp_path, attempt):
    """SIGTERM from the workers at every piece (so some arrive while the first one is being handled): exit 130,
    nothing left, and no worker still copying once the command has returned (the race that once killed the process
    with the default SIGTERM action after clean-up)."""
    args = ["merge", str(ckpt), str(tmp_path / "out"), "--workers", "2", "--max-shard-size", "20KB"]
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_STORM, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted: nothing was written" in proc.stderr
    assert proc.stdout.strip() == "threads=1 late_calls=0"
    assert leftovers(tmp_path, "out") == []


def test_signals_deferred_keeps_ignored_signals_ignored():
    """An ignored SIGINT (a background job, nohup) must not start interrupting a conversion."""
    import signal

    from automodel_convert.convert.destination import signals_deferred

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        seen = []
        with signals_deferred(on_signal=lambda: seen.append(1)):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
        assert seen == [] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_signal_stops_the_workers_at_their_next_piece(ckpt, tmp_path, monkeypatch):
    """In-process: Ctrl-C during a copy stops every worker at its next piece (no more copies after the first
    one), then raises KeyboardInterrupt with nothing left behind."""
    import os
    import signal
    import threading

    import automodel_convert.convert.engine as engine
    from automodel_convert.convert import merge

    calls = []
    handled = threading.Event()
    real_copy, real_deferred = engine.copy_range, engine.signals_deferred

    def interrupt_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: to the process; Python handles it in the main thread
            assert handled.wait(30), "the main thread did not handle SIGINT"
        return real_copy(*a, **k)

    def deferred_and_seen(on_signal):
        return real_deferred(on_signal=lambda: (on_signal(), handled.set()))

    monkeypatch.setattr(engine, "copy_range", interrupt_once)
    monkeypatch.setattr(engine, "signals_deferred", deferred_and_seen)
    with pytest.raises(KeyboardInterrupt):
        merge(ckpt, tmp_path / "out", workers=1, max_shard_size=20_000)
    assert len(calls) == 1
    assert threading.active_count() == 1
    assert leftovers(tmp_path, "out") == []


def test_bad_max_shard_size(run_cli, ckpt, tmp_path):
    _assert_bad(run_cli, ["merge", ckpt, tmp_path / "out", "--max-shard-size", "lots"], tmp_path / "out", "--max-shard-size")


def test_usage_error_exit_2(run_cli, ckpt, tmp_path):
    code, _, _ = run_cli("merge", ckpt, tmp_path / "out", "--no-such-flag")
    assert code == 2


def test_debug_shows_traceback(run_cli, tmp_path, capsys):
    code, _, err = run_cli("merge", tmp_path / "nope", tmp_path / "out", "--debug")
    assert code == 2 and "Traceback" in err
