"""Other MoE types: transformers' own class with our grouped experts registered through its experts interface."""

from __future__ import annotations

import pytest
import torch

from automodel_convert.models import AutoModelForCausalLM, BackendConfig
from automodel_convert.models.common import hf_experts
from automodel_convert.models.testing import FALLBACK, VOCAB, grad_diffs, max_abs, tiny_config, tiny_hf_model

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def counted(monkeypatch):  # noqa: ANN001, ANN201
    """Register a counting wrapper so a test can prove our function ran."""
    calls = []
    original = hf_experts.hf_experts_forward

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_experts, "hf_experts_forward", wrapper)
    yield calls
    hf_experts.register()  # restore the real function in transformers' interface


@pytest.mark.parametrize("model_type", sorted(FALLBACK))
def test_registered_experts_match_eager(model_type: str, counted: list) -> None:
    ref = tiny_hf_model(model_type)
    key = hf_experts.register()
    ours = tiny_hf_model(model_type, experts=key)
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out = ours(input_ids=ids, labels=ids, use_cache=False)
    assert counted, "our experts implementation was not dispatched"
    assert max_abs(out.logits, out_ref.logits) < 1e-5
    out_ref.loss.backward()
    out.loss.backward()
    assert max(grad_diffs(ref, ours).values()) < 1e-4


def test_auto_from_config_falls_back_with_our_experts() -> None:
    model = AutoModelForCausalLM.from_config(tiny_config("phimoe"), BackendConfig(attn="eager", experts="padded"))
    assert type(model).__module__.startswith("transformers.")
    assert model.config._experts_implementation == hf_experts.EXPERTS_KEY
    experts = [m for m in model.modules() if hasattr(m, "automodel_impl")]
    assert experts and all(m.automodel_impl == "padded" for m in experts)
    out = model(input_ids=torch.randint(3, VOCAB, (1, 7)))
    assert torch.isfinite(out.logits).all()


def test_ep_sentinels_are_dropped() -> None:
    model = tiny_hf_model("minimax", experts=hf_experts.register())
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 64)
    idx = torch.tensor([[0, 1], [2, 6], [6, 6], [3, 4], [5, 0]])  # 6 = sentinel (num_experts = 6)
    w = torch.rand(5, 2)
    experts._is_expert_parallel = True
    out = experts(x, idx, w)
    experts._is_expert_parallel = False
    keep = (idx < 6).float()
    ref = experts(x, idx.clamp(max=5), w * keep)
    assert max_abs(out, ref) < 1e-6
