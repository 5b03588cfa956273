"""The trainer (`automodel_convert.train`) end to end on CPU (gloo, float32, bundled tiny qwen3_moe checkpoint).

- preflight errors (ep not dividing the world, a type without EP support, a sequence too long) are one line, exit 2,
  before any weight is read;
- ten steps on packed JSON-lines text (tokenized by the checkpoint's tokenizer) lower the loss;
- EP=2 over 2 spawned ranks: save at step 2, resume from it (DCP train state): steps 3-4 equal the uninterrupted run's, bit for bit;
- the saved HF checkpoint (original per-expert layout) loads in transformers v5 with no missing/unexpected keys, and
  its logits equal, exactly, transformers' logits on the trained parameters gathered from the ranks' memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
import torch

from automodel_convert.train import main

from conftest import fixture_path
from spawn_ranks import run_ranks

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a b c d e f g h i j k l m n o p",
    "one two three four five six seven eight nine ten",
    "red green blue red green blue red green blue",
]


def checkpoint_with_tokenizer(dst) -> str:  # noqa: ANN001
    """The qwen3_moe fixture plus a tiny word-level tokenizer (ids below the fixture's vocab) and a JSON-lines corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(fixture_path("qwen3_moe"), dst)
    words = sorted({w for line in TEXT for w in line.split()})
    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(dst)
    with open(os.path.join(dst, "train.jsonl"), "w") as f:
        for _ in range(40):
            for line in TEXT:
                f.write(json.dumps({"text": line}) + "\n")
    return str(dst)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("train") / "qwen3")


def test_preflight_errors(ckpt, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--model", ckpt, "--ep", "2", "--seq", "16", "--steps", "1"]) == 2
    assert "--ep 2 does not divide the world size 3" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--model", ckpt, "--seq", "100000", "--steps", "1"]) == 2
    assert "longer than the model allows (max_position_embeddings=" in capsys.readouterr().err
    assert main(["--model", str(fixture_path("gpt_oss")), "--seq", "16", "--steps", "1"]) == 2
    assert "no expert-parallel support" in capsys.readouterr().err
    assert main(["--model", str(fixture_path("jamba")), "--seq", "16", "--steps", "1"]) == 2
    assert "has no zoo model for expert-parallel training" in capsys.readouterr().err
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_cuda_graphs_need_one_gpu(ckpt, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--model", ckpt, "--seq", "16", "--steps", "1", "--cuda-graphs", "--device", "cpu", "--dtype", "float32"]) == 2
    assert "--cuda-graphs needs one CUDA GPU" in capsys.readouterr().err


def test_ten_steps_lower_the_loss(ckpt, tmp_path):
    metrics = tmp_path / "m.jsonl"
    rc = main(["--model", ckpt, "--data", os.path.join(ckpt, "train.jsonl"), "--seq", "24", "--steps", "10", "--lr", "3e-3",
               "--dtype", "float32", "--metrics", str(metrics), "--quiet", "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.85 * first, (first, last)  # ~5.0 -> ~3.9 on this corpus
    for key in ("tokens_per_s", "peak_rss_gib", "expert_load_max_over_mean", "grad_norm", "forward_ms", "backward_ms", "optimizer_ms"):
        assert rows[-1][key] > 0, key
    for key in ("tflops_per_gpu", "mfu", "tokens_per_s_per_gpu"):  # FLOP figures mean nothing on a CPU (issue 16)
        assert key not in rows[-1], key


def test_overlap_optimizer_matches_and_resumes(ckpt, tmp_path, monkeypatch, capsys):
    """--overlap-optimizer (AdamW inside backward) follows the standard loop's losses; save/resume stays exact."""
    from automodel_convert.train import TrainArgs, Trainer

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--model", ckpt, "--seq", "16", "--steps", "1", "--ep", "2", "--overlap-optimizer", "--grad-clip", "0"]) == 2
    assert "--overlap-optimizer with 4 ranks needs --ep 4" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    common = dict(model=ckpt, data=os.path.join(ckpt, "train.jsonl"), seq=16, steps=4, lr=3e-3, warmup=2, dtype="float32", quiet=True, device="cpu", grad_clip=0.0)
    ref = [m["loss"] for m in Trainer(TrainArgs(**common)).run()]
    a = Trainer(TrainArgs(**common, overlap_optimizer=True, save=str(tmp_path / "a"), save_every=2))
    got = [m["loss"] for m in a.run()]
    assert got == pytest.approx(ref, rel=1e-5) and got[3] < got[0], (got, ref)  # foreach (standard, CPU) vs per-tensor AdamW
    b = Trainer(TrainArgs(**common, overlap_optimizer=True, resume=str(tmp_path / "a" / "step-2")))
    assert [m["loss"] for m in b.run()] == got[2:]


def _worker(rank: int, world: int, ckpt: str, out: str) -> dict | None:
    from automodel_convert.train import TrainArgs, Trainer

    common = dict(model=ckpt, data=os.path.join(ckpt, "train.jsonl"), ep=2, seq=16, steps=4, lr=3e-3, dtype="float32", quiet=True, device="cpu")
    a = Trainer(TrainArgs(**common, save=f"{out}/a", save_every=2))
    hist_a = a.run()
    b = Trainer(TrainArgs(**common, resume=f"{out}/a/step-2"))
    hist_b = b.run()
    full = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in a.export_state().items()}
    return {"a": [m["loss"] for m in hist_a], "b": [m["loss"] for m in hist_b], "full": full} if rank == 0 else None


def test_ep2_save_resume_and_transformers_logits(ckpt):
    import transformers

    with tempfile.TemporaryDirectory() as out:
        res = run_ranks(_worker, 2, ckpt, out)[0]
        assert len(res["a"]) == 4 and len(res["b"]) == 2
        assert res["b"][0] == res["a"][2], (res["a"], res["b"])  # step 3 after resume == step 3 uninterrupted
        assert res["b"][1] == res["a"][3]

        saved = f"{out}/a/step-4/model"
        with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
            original_keys = set(json.load(f)["weight_map"])
        with open(os.path.join(saved, "model.safetensors.index.json")) as f:
            assert set(json.load(f)["weight_map"]) == original_keys  # original per-expert layout
        model, info = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        ref = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        missing, unexpected = ref.load_state_dict({k: v.float() for k, v in res["full"].items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        ref.tie_weights()
        ids = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        # and training did change the experts, so the equality above is about the trained weights
        orig = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        key = next(k for k in res["full"] if k.endswith("experts.gate_up_proj"))
        assert not torch.equal(orig.state_dict()[key], model.state_dict()[key])


@pytest.mark.parametrize("name,says", [("deepep", "dispatcher 'deepep'"), ("deepep_static", "dispatcher 'deepep_static'"),
                                       ("nccl2", "dispatcher 'nccl2' is unknown")])
def test_dispatcher_that_cannot_run_is_a_one_line_error(ckpt, capsys, monkeypatch, name, says):
    """deep_ep not importable (CI) or no CUDA, or an unknown name: one line, exit 2, before any weight is read."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--model", ckpt, "--seq", "16", "--steps", "1", "--dispatcher", name, "--dtype", "float32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_deepep_static_with_experts_that_cannot_skip_padding_is_one_line(ckpt, capsys, monkeypatch):
    """Refused before the mesh, the dispatcher or any weight: only the grouped-GEMM experts skip padded rows."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = ["--model", ckpt, "--seq", "16", "--steps", "1", "--dispatcher", "deepep_static", "--backend", "experts=padded",
            "--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "deepep_static" in err and "experts=grouped_mm" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_activation_checkpointing_gives_the_same_losses(ckpt, tmp_path):
    """`--ac` recomputes each decoder layer in backward: same losses (float32, CPU), step for step."""
    runs = {}
    for ac in (False, True):
        metrics = tmp_path / f"ac{ac}.jsonl"
        argv = ["--model", ckpt, "--data", os.path.join(ckpt, "train.jsonl"), "--seq", "16", "--steps", "3", "--lr", "3e-3",
                "--dtype", "float32", "--metrics", str(metrics), "--quiet", "--device", "cpu"] + (["--ac"] if ac else [])
        assert main(argv) == 0
        runs[ac] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(runs[True]) == 3
    for a, b in zip(runs[False], runs[True]):
        assert abs(a - b) <= 1e-5, (runs[False], runs[True])


def test_activation_checkpointing_recomputes_each_layer(ckpt, monkeypatch):
    import torch.distributed as dist

    from automodel_convert.train import TrainArgs, Trainer

    monkeypatch.setenv("WORLD_SIZE", "1")
    calls = {}
    try:
        for ac in (False, True):
            t = Trainer(TrainArgs(model=ckpt, data="synthetic", seq=8, steps=1, dtype="float32", quiet=True, ac=ac, device="cpu"))
            n = [0]
            for layer in t.model.model.layers:
                layer.register_forward_pre_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))  # pre: recompute stops early
            t.step()
            calls[ac] = n[0]
            dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    layers = t.config.num_hidden_layers
    assert calls == {False: layers, True: 2 * layers}
