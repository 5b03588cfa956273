"""Every user mistake the trainer can see is one line on stderr, exit code 2, no traceback, and (where the mistake
does not need the weights) found before the model is loaded: `from_pretrained` is replaced by a function that fails
the test if it is ever reached.

Issue 16's symptoms: a checkpoint without tokenizer files trained on EOS tokens only and exited 0; on resume, no
`--data` raised KeyError, another data kind KeyError, another `--model` a size-mismatch RuntimeError, `--device cuda`
without CUDA an NCCL error, `--backend foo=bar` a TypeError; another data file, `--seq` or `--lr` were accepted
silently; `--save` onto another run's folder mixed the runs; a missing `--data` file was reported after loading.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from automodel_convert.train import main

from conftest import FIXTURES, fixture_path

CHAT = FIXTURES / "chat"
BASE = ["--model", str(fixture_path("qwen3_moe")), "--tokenizer", str(CHAT), "--seq", "32", "--dtype", "float32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real 2-step run with a checkpoint at step 2 (the resume mistakes below are made against it)."""
    root = tmp_path_factory.mktemp("run") / "run"
    assert main([*BASE, "--data", str(CHAT / "chat.jsonl"), "--steps", "2", "--save", str(root)]) == 0
    return root


@pytest.fixture
def no_model_load(monkeypatch):
    from automodel_convert.models import AutoModelForCausalLM

    def refuse(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(refuse))
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", staticmethod(refuse))


def one_line_error(capsys, argv: list[str], expect: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("automodel-train: error: ") and expect in err, err
    return err


def test_checkpoint_without_tokenizer_is_refused(capsys, no_model_load):
    # fixtures/qwen3_moe has no tokenizer files: AutoTokenizer returns a tokenizer with a vocabulary of 1
    argv = ["--model", str(fixture_path("qwen3_moe")), "--data", str(CHAT / "chat.jsonl"), "--seq", "32", "--steps", "1", "--device", "cpu"]
    one_line_error(capsys, argv, "tokenizer is degenerate")


def test_degenerate_and_missing_tokenizer(tmp_path, capsys, no_model_load):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>").save_pretrained(tmp_path / "tok")
    argv = [*BASE[:2], "--data", str(CHAT / "chat.jsonl"), "--seq", "32", "--steps", "1", "--device", "cpu"]
    one_line_error(capsys, [*argv, "--tokenizer", str(tmp_path / "tok")], "degenerate")
    one_line_error(capsys, [*argv, "--tokenizer", str(tmp_path / "nowhere")], "--tokenizer")


def test_data_mistakes_before_the_model_loads(tmp_path, capsys, no_model_load):
    one_line_error(capsys, [*BASE, "--data", str(tmp_path / "missing.jsonl")], "no such file")
    one_line_error(capsys, [*BASE, "--eval-data", str(tmp_path / "missing.txt")], "no such file")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    one_line_error(capsys, [*BASE, "--data", str(tmp_path / "bad.jsonl")], "expected text, messages, prompt+completion or input_ids")
    (tmp_path / "x.csv").write_text("a,b\n")
    one_line_error(capsys, [*BASE, "--data", str(tmp_path / "x.csv")], "unknown file type")


def test_option_mistakes(capsys, no_model_load):
    one_line_error(capsys, [*BASE, "--backend", "foo=bar"], "unknown key(s) foo")
    one_line_error(capsys, [*BASE, "--backend", "attn"], "key=value")
    one_line_error(capsys, [*BASE, "--lr-schedule", "step"], "invalid choice")
    one_line_error(capsys, [*BASE, "--grad-accum", "0"], "--grad-accum 0")
    one_line_error(capsys, [*BASE, "--overlap-optimizer"], "--grad-clip 0")
    one_line_error(capsys, [*BASE, "--eval-every", "5"], "--eval-every needs --eval-data")
    one_line_error(capsys, [*BASE, "--nonsense"], "unrecognized arguments")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no CUDA")
def test_device_cuda_without_cuda(capsys, no_model_load):
    one_line_error(capsys, [*BASE[:-3], "--device", "cuda"], "no CUDA GPU")


def test_resume_mistakes(run_dir, capsys, tmp_path, no_model_load):
    step = str(run_dir / "step-2")
    one_line_error(capsys, ["--resume", step, "--model", str(fixture_path("mixtral"))], "trained with --model")
    one_line_error(capsys, ["--resume", step, "--data", "synthetic", "--seq", "16"], "trained with --data")
    one_line_error(capsys, ["--resume", step, "--data", str(CHAT / "eval.jsonl")], "trained with --data")
    one_line_error(capsys, ["--resume", step, "--seq", "64"], "trained with --seq 32, not 64")
    one_line_error(capsys, ["--resume", step, "--lr", "0.5"], "trained with --lr")
    one_line_error(capsys, ["--resume", step, "--backend", "foo=bar"], "unknown key(s) foo")
    one_line_error(capsys, ["--resume", str(tmp_path)], "no trainer.json")
    one_line_error(capsys, ["--resume", str(tmp_path / "latest")], "no step-N folders")
    broken = tmp_path / "broken" / "step-1"
    broken.mkdir(parents=True)
    (broken / "trainer.json").write_text(json.dumps({"step": 1}))
    one_line_error(capsys, ["--resume", str(broken)], "not from this trainer")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no CUDA")
def test_resume_on_cuda_without_cuda(run_dir, capsys, no_model_load):
    one_line_error(capsys, ["--resume", str(run_dir / "step-2"), "--device", "cuda"], "no CUDA GPU")


def test_save_onto_another_runs_folder(run_dir, capsys, tmp_path, no_model_load):
    one_line_error(capsys, [*BASE, "--data", str(CHAT / "chat.jsonl"), "--save", str(run_dir)], "holds another run")
    legacy = tmp_path / "legacy"
    shutil.copytree(run_dir / "step-2", legacy / "step-2")
    one_line_error(capsys, [*BASE, "--data", str(CHAT / "chat.jsonl"), "--save", str(legacy)], "earlier run")


def test_resume_without_data_reuses_the_runs_arguments(run_dir, tmp_path):
    """No --data (the KeyError of the issue): the run's data, seq and lr come from trainer.json."""
    from automodel_convert.train import TrainConfig, Trainer

    t = Trainer(TrainConfig(resume=str(run_dir / "latest"), steps=3, device="cpu", quiet=True))
    assert t.cfg.data == str(CHAT / "chat.jsonl") and t.cfg.seq == 32 and t.step_index == 2
    assert t.cfg.save == str(run_dir)
    import torch.distributed as dist

    dist.destroy_process_group()


def _edited_step(run_dir, tmp_path, **args):  # noqa: ANN001, ANN003
    """A copy of the run's step-2 whose trainer.json records other run-shape arguments."""
    step = tmp_path / "edited" / "step-2"
    shutil.copytree(run_dir / "step-2", step)
    meta = json.loads((step / "trainer.json").read_text())
    meta["args"].update(args)
    meta["args"]["save"] = str(tmp_path / "edited")
    (step / "trainer.json").write_text(json.dumps(meta))
    (tmp_path / "edited" / "run.json").write_text(json.dumps({"run_id": meta["run_id"]}))
    return step


def test_resume_restores_the_runs_shape_and_refuses_what_cannot_run(run_dir, tmp_path, capsys, monkeypatch, no_model_load):
    from automodel_convert.train.config import parse

    monkeypatch.setenv("WORLD_SIZE", "1")
    step = _edited_step(run_dir, tmp_path, ep=2, ac=True, dispatcher="alltoall")
    one_line_error(capsys, ["--resume", str(step)], f"--resume {step}: the run was trained with --ep 2, which does not divide the "
                   "world size 1 here; give --ep from [1]")
    step = _edited_step(run_dir, tmp_path / "b", cuda_graphs=True)
    one_line_error(capsys, ["--resume", str(step)], "--cuda-graphs replays plain causal attention: add --packing-mask causal or use "
                   "synthetic data (restored from the resumed run: --cuda-graphs; give another value to change it)")
    # restored where not given; a given value (--ep 1, --no-ac) wins
    from automodel_convert.train.config import merge_resumed

    saved = json.loads((_edited_step(run_dir, tmp_path / "c", ep=2, ac=True, backend="attn=eager", doc_attention="mask",
                                     reshard_after_forward=False) / "trainer.json").read_text())["args"]
    cfg = merge_resumed(parse(["--resume", "x"])[0], saved, "x")
    assert (cfg.ep, cfg.ac, cfg.backend, cfg.doc_attention, cfg.reshard_after_forward) == (2, True, "attn=eager", "mask", False)
    cfg = merge_resumed(parse(["--resume", "x", "--ep", "1", "--no-ac", "--reshard-after-forward"])[0], saved, "x")
    assert (cfg.ep, cfg.ac, cfg.reshard_after_forward) == (1, False, True)
    assert merge_resumed(parse(["--resume", "x"])[0], {"seq": 32}, "x").ep == 1  # a trainer.json without ep
