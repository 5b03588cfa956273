"""Packed documents through `varlen_attn` on a GPU (marked `gpu`; run on the device, skipped without CUDA).

Against the explicit block-causal mask (sdpa with a `[B, 1, S, S]` bool mask, the path varlen replaces) and a float32
reference of that mask: attention outputs and the gradients of q, k, v in bf16 (GQA, MHA, and MLA's value head dim
below the query's); the tiny qwen3_moe (head_dim 64) loss and all its gradients; and the trainer end to end
with `--doc-attention varlen` (metrics say "varlen" on every step).
"""

from __future__ import annotations

import json

import pytest
import torch

from automodel_convert.models.common.attention import DocumentMasks, attention, varlen_api

from conftest import FIXTURES, fixture_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(varlen_api() is None, reason="needs torch.nn.attention.varlen (torch >= 2.9)"),
]


def _doc_ids(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]).cuda()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("hq,hkv,d,dv", [(8, 2, 64, 64), (8, 8, 128, 128), (4, 4, 192, 128)])
def test_varlen_equals_the_explicit_mask_values_and_gradients(hq, hkv, d, dv):
    g = torch.Generator(device="cuda").manual_seed(0)
    doc_ids = _doc_ids([[300, 1, 500, 223], [1024], [17, 1007]])
    b, s = doc_ids.shape
    leaves = [torch.randn(b, h, s, dim, device="cuda", generator=g) for h, dim in ((hq, d), (hkv, d), (hkv, dv))]
    grad_out = torch.randn(b, s, hq, dv, device="cuda", generator=g)
    results = {}
    for name, kernel, dtype in (("varlen", "auto", torch.bfloat16), ("mask", "mask", torch.bfloat16), ("fp32", "mask", torch.float32)):
        q, k, v = (t.to(dtype).requires_grad_() for t in leaves)
        masks = DocumentMasks(doc_ids, kernel=kernel)
        out = attention(q, k, v, masks, scale=d**-0.5, impl="sdpa")
        out.backward(grad_out.to(dtype))
        assert masks.kernels == ({"varlen": 1} if name == "varlen" else {"sdpa-mask": 1}), masks.kernels
        results[name] = [out.detach(), q.grad, k.grad, v.grad]
    for what, got, bf16_mask, ref in zip(("out", "dq", "dk", "dv"), results["varlen"], results["mask"], results["fp32"]):
        # element by element within a few bf16 steps of the largest value (bf16 keeps 8 bits)
        worst = (got.float() - bf16_mask.float()).abs().max().item()
        assert worst <= 2e-2 * bf16_mask.float().abs().max().item(), (what, worst)
        # and as a whole no worse than the bf16 explicit-mask path itself, against the fp32 reference
        assert _rel(got, ref) <= 2 * _rel(bf16_mask, ref) + 1e-2, (what, _rel(got, ref), _rel(bf16_mask, ref))


def _qwen3(head_dim: int = 64):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(fixture_path("qwen3_moe"))
    config.head_dim = head_dim  # the fixture's 12 is not a multiple of 8: flash would not take it
    config.moe_intermediate_size, config.max_position_embeddings = 32, 1024  # grouped_mm's 16-byte alignment; seq 256
    return config


def test_model_loss_and_gradients_match_the_explicit_mask():
    from automodel_convert.models import AutoModelForCausalLM
    from automodel_convert.train.masking import DocumentMasking

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_qwen3(), "attn=auto", dtype=torch.bfloat16, device="cuda")
    model.train()
    doc_ids = _doc_ids([[40, 88], [1, 127], [128]])
    ids = torch.randint(0, 100, doc_ids.shape, device="cuda")
    pos = torch.cat([torch.arange(n) for row in ([40, 88], [1, 127], [128]) for n in row]).view_as(doc_ids).cuda()
    results = {}
    for kernel in ("auto", "mask"):
        masking = DocumentMasking(model, kernel)
        model.zero_grad()
        with masking.documents(doc_ids):
            out = model(input_ids=ids, position_ids=pos, shift_labels=ids.roll(-1, 1))
        out.loss.backward()
        masking.remove()
        layers = model.config.num_hidden_layers
        assert masking.last_kernels == ({"varlen": layers} if kernel == "auto" else {"sdpa-mask": layers})
        results[kernel] = (out.loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
    assert abs(results["auto"][0] - results["mask"][0]) < 1e-2 * results["mask"][0].abs()
    # all gradients as one vector (bf16 noise may flip a router's top-k for a token, so not parameter by parameter);
    # attending across the 40/88 boundary would move them far more
    names = sorted(results["mask"][1])
    a, b = (torch.cat([results[k][1][n].flatten() for n in names]) for k in ("auto", "mask"))
    assert names == sorted(results["auto"][1]) and torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert _rel(a, b) < 0.1


def test_trainer_runs_varlen_and_says_so(tmp_path):
    from automodel_convert.train import main

    _qwen3().save_pretrained(tmp_path / "model")
    metrics = tmp_path / "m.jsonl"
    argv = ["--model", str(tmp_path / "model"), "--init", "random", "--tokenizer", str(FIXTURES / "chat"), "--data",
            str(FIXTURES / "chat" / "chat.jsonl"), "--seq", "256", "--batch", "2", "--steps", "3", "--device", "cuda",
            "--doc-attention", "varlen", "--metrics", str(metrics), "--quiet"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["doc_attention"] for r in rows] == ["varlen"] * 3
