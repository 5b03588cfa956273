"""`--overlap-optimizer` at ep = world (2 spawned gloo ranks): the experts are updated inside backward, the FSDP
parameters after it (`train.optim.SplitOverlappedAdamW`), and training equals the standard loop bit for bit: the
same losses and the same parameters on every rank after 4 steps, and a save/resume in the middle changes nothing."""

from __future__ import annotations

import hashlib

import torch

from spawn_ranks import run_ranks


def _digest(model) -> dict[str, str]:  # noqa: ANN001
    out = {}
    for n, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out[n] = hashlib.sha256(local.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def _worker(rank: int, world: int, folder: str, overlap: bool, save: str | None, resume: str | None, steps: int) -> dict:
    from automodel_convert.train import TrainArgs, Trainer

    t = Trainer(TrainArgs(model=folder, ep=2, seq=32, steps=steps, lr=3e-3, warmup=1, dtype="float32", quiet=True, device="cpu",
                          grad_clip=0.0, overlap_optimizer=overlap, dispatcher="alltoall", save=save, save_every=2 if save else 0, resume=resume))
    losses = [m["loss"] for m in t.run()]
    return {"losses": losses, "params": _digest(t.model), "optimizer": type(t.optimizer).__name__}


def test_overlap_optimizer_at_ep2_equals_standard_loop_and_resumes(tmp_path):
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    ref = run_ranks(_worker, 2, model, False, None, None, 4)
    ovl = run_ranks(_worker, 2, model, True, str(tmp_path / "run"), None, 4)
    assert ovl[0]["optimizer"] == "SplitOverlappedAdamW" and ref[0]["optimizer"] == "AdamW"
    assert len(set(ref[0]["losses"])) == 4  # the updates change the loss
    for r in range(2):
        assert ovl[r]["losses"] == ref[r]["losses"]
        assert ovl[r]["params"] == ref[r]["params"]
    resumed = run_ranks(_worker, 2, model, True, None, str(tmp_path / "run" / "step-2"), 4)
    for r in range(2):
        assert resumed[r]["losses"] == ref[r]["losses"][2:]
        assert resumed[r]["params"] == ref[r]["params"]
