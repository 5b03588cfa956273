"""Zoo vs transformers v5 on tiny random models: same state dict (strict), same logits, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from automodel_convert.models import BackendConfig, get_model_class
from automodel_convert.models.registry import VERIFIED
from automodel_convert.models.testing import VOCAB, ZOO, grad_diffs, max_abs, tiny_hf_model

LOGIT_TOL, GRAD_TOL = 1e-5, 1e-4


def _pair(model_type: str, backend: BackendConfig | None = None, **overrides):  # noqa: ANN202
    ref = tiny_hf_model(model_type, **overrides)
    ours = get_model_class(model_type).from_config(ref.config, backend or BackendConfig(), device="cpu", init=False)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(ours.state_dict()) == set(ref.state_dict())
    return ref, ours.eval()


def _inputs(seed: int = 1, batch: int = 2, seq: int = 13) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_registry_covers_the_verified_families() -> None:
    assert set(VERIFIED) == set(ZOO)
    for mt in VERIFIED:
        assert get_model_class(mt) is not None, mt


@pytest.mark.parametrize("model_type", VERIFIED)
def test_logits_loss_and_grads_match_transformers(model_type: str) -> None:
    ref, ours = _pair(model_type)
    ids = _inputs()
    labels = ids.clone()
    labels[0, :3] = -100
    out_ref = ref(input_ids=ids, labels=labels, use_cache=False)
    out = ours(input_ids=ids, labels=labels, return_logits=True)
    assert max_abs(out.logits, out_ref.logits) < LOGIT_TOL
    assert max_abs(out.loss, out_ref.loss) < LOGIT_TOL
    if getattr(out_ref, "aux_loss", None) is not None:
        assert max_abs(out.aux_loss, out_ref.aux_loss) < LOGIT_TOL
    out_ref.loss.backward()
    out.loss.backward()
    diffs = grad_diffs(ref, ours)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < GRAD_TOL, (worst, diffs[worst])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("backend", [dict(attn="eager", experts="padded", loss="full"), dict(experts="loop")])
def test_other_backends_match(model_type: str, backend: dict) -> None:
    ref, ours = _pair(model_type, BackendConfig(**backend))
    ids = _inputs(seed=2)
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out = ours(input_ids=ids, labels=ids, return_logits=True)
    assert max_abs(out.logits, out_ref.logits) < LOGIT_TOL
    assert max_abs(out.loss, out_ref.loss) < LOGIT_TOL
    out_ref.loss.backward()
    out.loss.backward()
    assert max(grad_diffs(ref, ours).values()) < GRAD_TOL


def test_unaligned_expert_width_takes_the_padded_path() -> None:
    # I = 37: rows of 148 bytes, which torch's grouped GEMM refuses; "auto" must still be exact
    ref, ours = _pair("qwen3_moe", moe_intermediate_size=37)
    ids = _inputs(seed=3)
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out = ours(input_ids=ids, labels=ids, return_logits=True)
    assert max_abs(out.logits, out_ref.logits) < LOGIT_TOL
    out_ref.loss.backward()
    out.loss.backward()
    assert max(grad_diffs(ref, ours).values()) < GRAD_TOL


def test_right_padding_mask_matches() -> None:
    ref, ours = _pair("qwen2_moe")
    ids = _inputs(seed=4)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    keep = mask.bool()
    assert max_abs(out.logits[keep], out_ref.logits[keep]) < LOGIT_TOL
    assert max_abs(out.loss, out_ref.loss) < LOGIT_TOL
    assert max_abs(out.aux_loss, out_ref.aux_loss) < LOGIT_TOL


def test_tied_embeddings_and_num_items_in_batch() -> None:
    ref, ours = _pair("mixtral", tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = _inputs(seed=5)
    out_ref = ref(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(40), use_cache=False)
    out = ours(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(40))
    assert out.logits is None  # chunked loss: no full logits unless asked for
    assert max_abs(out.loss, out_ref.loss) < LOGIT_TOL
    out_ref.loss.backward()
    out.loss.backward()
    assert max(grad_diffs(ref, ours).values()) < GRAD_TOL


def test_chunked_loss_with_small_chunks_matches_full() -> None:
    ref, ours = _pair("olmoe", BackendConfig(loss_chunk_tokens=5))
    ids = _inputs(seed=6, seq=17)
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out = ours(input_ids=ids, labels=ids)
    assert max_abs(out.loss, out_ref.loss) < LOGIT_TOL
    (2.0 * out_ref.loss).backward()
    (2.0 * out.loss).backward()  # backward scales the gradients stored by the forward
    assert max(grad_diffs(ref, ours).values()) < GRAD_TOL


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    ref, ours = _pair("glm4_moe")
    ours.train()
    ours.gradient_checkpointing_enable()
    ids = _inputs(seed=7)
    ref(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    ours(input_ids=ids, labels=ids).loss.backward()
    assert max(grad_diffs(ref, ours).values()) < GRAD_TOL


def test_bf16_forward_backward_runs_and_stays_close() -> None:
    ref, ours = _pair("qwen3_moe")
    ours.cast(torch.bfloat16)
    ids = _inputs(seed=8)
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out = ours(input_ids=ids, labels=ids)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - out_ref.loss.item()) < 5e-2
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_sigmoid_router_stays_fp32_under_bf16() -> None:
    _, ours = _pair("deepseek_v3")
    ours.cast(torch.bfloat16)
    gate = ours.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert ours.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ids = _inputs(seed=9)
    assert torch.isfinite(ours(input_ids=ids, labels=ids).loss)
