"""from_pretrained / save_pretrained on the bundled tiny checkpoints (fixtures/): same numbers as transformers,
and a bit-for-bit round trip to the original per-expert layout and through the fused layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from automodel_convert.models import AutoModelForCausalLM, MoECausalLM
from automodel_convert.models.common import hf_experts
from automodel_convert.models.registry import VERIFIED
from automodel_convert.models.testing import max_abs

from conftest import folder_tensors

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
pytestmark = pytest.mark.filterwarnings("ignore")


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "config.json").exists():
        pytest.skip(f"fixture {name} is missing (fixtures/make_fixtures.py)")
    return path




def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("model_type", VERIFIED)
def test_from_pretrained_matches_transformers(model_type: str) -> None:
    src = fixture(model_type)
    ours = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert isinstance(ours, MoECausalLM) and ours.model_type == model_type
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager")
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    assert max_abs(ours.eval()(input_ids=ids).logits, ref.eval()(input_ids=ids, use_cache=False).logits) < 1e-5


@pytest.mark.parametrize("model_type", VERIFIED)
def test_save_original_layout_is_bit_exact_and_fused_round_trips(model_type: str, tmp_path: Path) -> None:
    src = fixture(model_type)
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "original")
    want, got = folder_tensors(src), folder_tensors(tmp_path / "original")
    assert set(got) == set(want)
    assert [k for k in want if not same_bits(want[k], got[k])] == []

    model.save_pretrained(tmp_path / "fused", layout="fused")
    fused_keys = set(folder_tensors(tmp_path / "fused"))
    assert any(k.endswith("experts.gate_up_proj") for k in fused_keys)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(same_bits(a[k], b[k]) for k in a)
    again.save_pretrained(tmp_path / "original2")
    back = folder_tensors(tmp_path / "original2")
    assert set(back) == set(want) and all(same_bits(want[k], back[k]) for k in want)


def test_other_type_loads_as_transformers_with_our_experts(tmp_path: Path) -> None:
    src = fixture("hunyuan_v1_moe")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert type(model).__module__.startswith("transformers.")
    assert model.config._experts_implementation == hf_experts.EXPERTS_KEY
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager")
    ids = torch.randint(3, 60, (1, 9), generator=torch.Generator().manual_seed(1))
    assert max_abs(model.eval()(input_ids=ids).logits, ref.eval()(input_ids=ids, use_cache=False).logits) < 1e-5
    AutoModelForCausalLM.save_pretrained(model, tmp_path / "out")
    assert set(folder_tensors(tmp_path / "out")) == set(folder_tensors(src))
