"""Packed documents through `torch.nn.attention.varlen.varlen_attn` (issue 16), what can be checked on a CPU.

`varlen_attn` is a CUDA kernel (`aten::_flash_attention_forward` has no CPU implementation), so here:
- `cu_seqlens` from doc_ids (rows concatenated, a row start always starts a document) against hand-made values and
  against the packed windows' restarting `position_ids`;
- the trainer hands the model positions that restart at every document (captured from the model's own forward);
- the dispatch: which kernel `document_kernel` / `masking.plan` pick (device, dtype, sliding window, sinks, impl)
  and the refusals, one line before the weights load;
- the call itself, with `varlen_attn` replaced by a reference written with per-document sdpa (for each signature
  torch has had: `window_size` + `enable_gqa` + `scale` as in 2.13, `is_causal` without `enable_gqa`/`scale` as
  before): logits and gradients of the tiny qwen3_moe (GQA) and a deepseek_v3 (MLA, value dim 8 < query dim 16) equal the
  explicit-mask path, and each layer call is recorded as "varlen".
The kernel itself against the explicit mask, values and gradients in bf16: tests/test_train_varlen_gpu.py (`gpu`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automodel_convert.models.common import attention as attn_mod
from automodel_convert.models.common.attention import DocumentMasks, cu_seqlens, document_kernel
from automodel_convert.train import main
from automodel_convert.train.data import Packed, tokenize, window_fields
from automodel_convert.train.sources import records, resolve

from conftest import FIXTURES, fixture_path

CHAT = FIXTURES / "chat"


def test_cu_seqlens_concatenate_rows_and_restart_at_each_row():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])
    cu, longest = cu_seqlens(doc_ids)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 8, 12] and longest == 4
    cu, longest = cu_seqlens(torch.zeros(3, 5, dtype=torch.long))  # one document per row
    assert cu.tolist() == [0, 5, 10, 15] and longest == 5
    with pytest.raises(ValueError, match="decrease"):
        cu_seqlens(torch.tensor([[0, 0, 1, 0]]))  # doc 0 in two runs: the explicit mask would join them


def test_cu_seqlens_agree_with_the_packed_windows_positions():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CHAT)
    stream = tokenize(records(resolve(str(CHAT / "eval.jsonl"))), tok, None, 0, 1, 128, show=False)
    batch = Packed(stream, 96, 4, 0, 1, seed=0).next_batch()
    cu, longest = cu_seqlens(batch["doc_ids"])
    pos = batch["position_ids"].reshape(-1)
    starts = torch.zeros_like(pos, dtype=torch.bool)
    starts[cu[:-1].long()] = True
    assert torch.equal(starts, pos == 0)  # a document starts exactly where the positions restart
    lengths = (cu[1:] - cu[:-1]).long()
    assert torch.equal(pos, torch.cat([torch.arange(n) for n in lengths.tolist()])) and longest == int(lengths.max())
    assert len(lengths) > 4  # several documents per window


def test_trainer_passes_positions_that_restart_per_document(monkeypatch, request):
    import torch.distributed as dist

    from automodel_convert.train.config import TrainConfig
    from automodel_convert.train.trainer import Trainer

    seen = []
    cfg = TrainConfig(model=str(fixture_path("qwen3_moe")), tokenizer=str(CHAT), data=str(CHAT / "chat.jsonl"), seq=64, batch=2,
                      steps=2, dtype="float32", device="cpu", quiet=True)
    trainer = Trainer(cfg)
    request.addfinalizer(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    trainer.model.register_forward_pre_hook(lambda mod, args, kw: seen.append((kw["position_ids"].clone(), kw["input_ids"].shape)), with_kwargs=True)
    batches = []
    real = trainer.data.next_batch
    monkeypatch.setattr(trainer.data, "next_batch", lambda: batches.append(real()) or batches[-1])
    m = trainer.step()
    assert m["doc_attention"] == "sdpa-mask" and len(seen) == 1
    pos, doc = seen[0][0], batches[0]["doc_ids"]
    cu, _ = cu_seqlens(doc)
    expect = torch.cat([torch.arange(n) for n in (cu[1:] - cu[:-1]).tolist()]).view_as(pos)
    assert torch.equal(pos, expect) and int((pos == 0).sum()) > doc.shape[0]  # restarts inside the rows too


def test_document_kernel_choice_and_refusals():
    bf16, f32 = torch.bfloat16, torch.float32
    assert document_kernel("auto", "auto", "cuda", bf16, 128, 128) == ("varlen", None)
    assert document_kernel("auto", "sdpa", "cuda", torch.float16, 192, 128) == ("varlen", None)  # MLA: v padded
    assert document_kernel("auto", "flash", "cuda", bf16, 64, 64) == ("varlen", None)
    for kw, says in [({"sliding_window": 128}, "sliding-window"), ({"sinks": True}, "sinks"), ({"dropout": 0.1}, "dropout"),
                     ({"cached": True}, "KV cache")]:
        name, why = document_kernel("auto", "auto", "cuda", bf16, 64, 64, **kw)
        assert name == "sdpa-mask" and says in why
    name, why = document_kernel("auto", "auto", "cpu", bf16, 64, 64)
    assert name == "sdpa-mask" and "CUDA only" in why
    assert document_kernel("auto", "sdpa", "cuda", f32, 64, 64)[0] == "sdpa-mask"
    assert document_kernel("auto", "eager", "cuda", bf16, 64, 64) == ("eager-mask", "attn=eager")
    assert document_kernel("mask", "auto", "cuda", bf16, 64, 64)[0] == "sdpa-mask"
    assert "head dims" in document_kernel("auto", "auto", "cuda", bf16, 12, 12)[1]  # flash needs multiples of 8
    with pytest.raises(NotImplementedError, match="varlen_attn cannot run here: varlen_attn runs on CUDA only"):
        document_kernel("varlen", "auto", "cpu", bf16, 64, 64)
    with pytest.raises(NotImplementedError, match="attn='flash' cannot keep packed documents apart"):
        document_kernel("auto", "flash", "cuda", bf16, 64, 64, sliding_window=8)
    with pytest.raises(NotImplementedError, match="attn='te'"):
        document_kernel("auto", "te", "cuda", bf16, 64, 64)


def _meta(name: str, backend: str = "", **overrides):
    from transformers import AutoConfig

    from automodel_convert.models import BackendConfig, get_model_class

    config = AutoConfig.from_pretrained(fixture_path(name))
    for k, v in overrides.items():
        setattr(config, k, v)
    with torch.device("meta"):
        return get_model_class(config.model_type)(config, BackendConfig(**dict(kv.split("=") for kv in backend.split(",") if kv)))


def test_plan_per_layer_before_the_weights():
    from automodel_convert.train.masking import plan

    assert plan(_meta("qwen3_moe", head_dim=64), "cuda", torch.bfloat16) == ({"varlen": 2}, [])
    assert plan(_meta("qwen3_moe", head_dim=64), "cuda", torch.bfloat16, "mask")[0] == {"sdpa-mask": 2}
    assert plan(_meta("deepseek_v3", v_head_dim=8), "cuda", torch.bfloat16)[0] == {"varlen": 3}  # MLA: qk 8+8, v 8
    counts, why = plan(_meta("gpt_oss"), "cuda", torch.bfloat16)  # sinks on every layer, a sliding window on one
    assert counts == {"sdpa-mask": 2} and any("sinks" in w for w in why)
    counts, why = plan(_meta("qwen3_moe", head_dim=64), "cpu", torch.float32)
    assert counts == {"sdpa-mask": 2} and "CUDA only" in why[0]
    with pytest.raises(NotImplementedError, match="varlen_attn cannot run here: attn=eager"):
        plan(_meta("qwen3_moe", "attn=eager", head_dim=64), "cuda", torch.bfloat16, "varlen")
    with pytest.raises(NotImplementedError, match="varlen_attn cannot run here: a sliding-window layer"):
        plan(_meta("gpt_oss"), "cuda", torch.bfloat16, "varlen")
    with pytest.raises(NotImplementedError, match="none of the zoo's attention layers"):
        plan(torch.nn.Linear(2, 2), "cuda", torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_trainer_refuses_impossible_document_kernels_in_one_line(capsys, monkeypatch):
    from automodel_convert.models import AutoModelForCausalLM

    def refuse(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(refuse))
    base = ["--model", str(fixture_path("qwen3_moe")), "--tokenizer", str(CHAT), "--data", str(CHAT / "chat.jsonl"), "--seq", "32", "--steps", "1"]
    for argv, says in [([*base, "--device", "cpu", "--doc-attention", "varlen"], "--doc-attention varlen runs varlen_attn, a CUDA kernel"),
                       ([*base, "--device", "cpu", "--packing-mask", "causal", "--doc-attention", "mask"], "is the kernel of --packing-mask document"),
                       ([*base, "--doc-attention", "varlen"], "--packing-mask document: packed documents through varlen_attn cannot "
                        "run here: varlen_attn runs on CUDA only, not cpu")]:  # device auto, bf16: found with the mesh
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err


# ------------------------------------------------------------ the call, with a reference varlen_attn on CPU


def _reference_varlen(style: str):
    """A stand-in for varlen_attn with one of torch's signatures: causal sdpa per `cu_seq` segment, recording calls."""
    calls = []

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):  # noqa: ANN001
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and q.dim() == 3
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and causal
        if k.shape[1] != q.shape[1]:
            assert gqa, "fewer key/value heads without enable_gqa"
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
        calls.append(style)
        return torch.cat(outs)

    if style == "window":  # torch 2.13
        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False):  # noqa: ANN001, ANN202
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, tuple(window_size) == (-1, 0), scale, enable_gqa)
    else:  # torch 2.9: is_causal, no scale, no enable_gqa
        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):  # noqa: ANN001, ANN202
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, False)
    import inspect

    return fn, frozenset(inspect.signature(fn).parameters), calls


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("style", ["window", "is_causal"])
def test_varlen_call_equals_the_explicit_mask(monkeypatch, name, style):
    from automodel_convert.models import AutoModelForCausalLM
    from automodel_convert.train.masking import DocumentMasking

    fn, params, calls = _reference_varlen(style)
    monkeypatch.setattr(attn_mod, "varlen_api", lambda: (fn, params))
    monkeypatch.setattr(attn_mod, "varlen_blocker", lambda *a, **k: None)  # pretend: CUDA, bf16
    if name == "deepseek_v3":  # MLA with a value head dim (8) below the query's (8 + 8): varlen gets v zero-padded
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(fixture_path(name))
        config.v_head_dim = 8
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, "attn=sdpa", dtype=torch.float32, device="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(fixture_path(name), dtype=torch.float32, backend="attn=sdpa", device="cpu")
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 24), generator=g)
    rows = [torch.tensor([0] * 7 + [1] * 9 + [2] * 8), torch.tensor([0] * 3 + [1] * 21)]
    doc_ids = torch.stack(rows)
    pos = torch.stack([window_fields(torch.zeros(25, dtype=torch.long), torch.ones(25, dtype=torch.bool), torch.cat([r, r[-1:]]))["position_ids"] for r in rows])
    labels = torch.randint(0, 100, (2, 24), generator=g)
    results = {}
    for kernel in ("auto", "mask"):
        masking = DocumentMasking(model, kernel)
        model.zero_grad()
        with masking.documents(doc_ids):
            out = model(input_ids=ids, position_ids=pos, shift_labels=labels, return_logits=True)
        out.loss.backward()
        results[kernel] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        masking.remove()
        layers = model.config.num_hidden_layers
        assert masking.last_kernels == ({"varlen": layers} if kernel == "auto" else {"sdpa-mask": layers})
    assert calls == [style] * model.config.num_hidden_layers
    torch.testing.assert_close(results["auto"][0], results["mask"][0], rtol=1e-5, atol=1e-5)
    for n, grad in results["mask"][1].items():
        torch.testing.assert_close(results["auto"][1][n], grad, rtol=1e-4, atol=1e-6, msg=n)


def test_varlen_kernel_refused_where_it_cannot_run():
    q = torch.randn(1, 2, 6, 8)
    masks = DocumentMasks(torch.tensor([[0, 0, 0, 1, 1, 1]]), kernel="varlen")
    with pytest.raises(NotImplementedError, match="CUDA only"):
        attn_mod.attention(q, q, q, masks, scale=0.3, impl="sdpa")
    masks = DocumentMasks(torch.tensor([[0, 0, 0, 1, 1, 1]]))
    out = attn_mod.attention(q, q, q, masks, scale=0.3, impl="sdpa")
    assert masks.kernels == {"sdpa-mask": 1} and "CUDA only" in masks.why[0]
    alone = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], q[:, :, a:b], q[:, :, a:b], is_causal=True, scale=0.3) for a, b in ((0, 3), (3, 6))], 2)
    torch.testing.assert_close(out, alone.transpose(1, 2))


def test_layers_without_zoo_masks_are_refused_not_run_across_documents():
    from automodel_convert.train.masking import DocumentMasking

    class Plain(torch.nn.Module):  # decoder layers that take no Masks (as transformers' own classes)
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.layers[0](x)

    model = Plain()
    masking = DocumentMasking(model)
    model(torch.zeros(1, 3, 4))  # outside the context: untouched
    with pytest.raises(NotImplementedError, match="takes no zoo attention masks"), masking.documents(torch.tensor([[0, 0, 1]])):
        model(torch.zeros(1, 3, 4))
