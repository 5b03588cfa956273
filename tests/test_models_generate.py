"""Zoo models as generators and savers, against transformers v5 as the reference.

- `generate()` (transformers' GenerationMixin, DynamicCache): greedy tokens equal transformers' own model's greedy
  tokens on the same weights, for every verified family, with and without left padding, with and without a cache.
- `save_pretrained`: config.json says the model's true dtype and generation_config.json is written, both as
  transformers' `save_pretrained` writes them for the same checkpoint; transformers loads our folder back with
  logits equal to its own model's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from automodel_convert.models import AutoModelForCausalLM, BackendConfig, get_model_class
from automodel_convert.models.registry import VERIFIED
from automodel_convert.models.testing import VOCAB, max_abs, tiny_hf_model

from conftest import fixture_path

NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread is many times faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(model_type: str, **overrides):  # noqa: ANN202
    """transformers' tiny model and the zoo model holding the same weights (float32, CPU, eval). Weights drawn with
    std 0.2 rather than 0.02: decisive logits, so greedy decoding varies and no near-tie decides a token."""
    ref = tiny_hf_model(model_type, **{"initializer_range": 0.2, **overrides})
    ours = get_model_class(model_type).from_config(ref.config, BackendConfig(), device="cpu", init=False)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


def _prompt(seed: int = 1, batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _greedy(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> GenerateDecoderOnlyOutput:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("model_type", VERIFIED)
def test_greedy_generate_matches_transformers(model_type: str) -> None:
    ref, ours = _pair(model_type)
    ids = _prompt()
    want = _greedy(ref, ids).sequences
    got = _greedy(ours, ids)
    assert torch.equal(got.sequences, want), (got.sequences, want)
    # the decode ran on transformers' DynamicCache: prompt + all new tokens but the last one are cached
    assert isinstance(got.cache, DynamicCache)
    assert got.cache.get_seq_length() == want.shape[1] - 1
    # not a vacuous comparison: the tiny model does not just repeat one token
    assert want[:, ids.shape[1]:].unique().numel() > 1


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_left_padded_generate_matches_transformers(model_type: str) -> None:
    # transformers 5.24 itself fails here when the config asks for router logits (its load-balancing loss pairs the
    # new token's router logits with the whole attention mask), so the reference runs without them
    ref, ours = _pair(model_type, output_router_logits=False)
    ids = _prompt(seed=2, seq=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = ref.config.pad_token_id
    want = _greedy(ref, ids, attention_mask=mask).sequences
    got = _greedy(ours, ids, attention_mask=mask).sequences
    assert torch.equal(got, want), (got, want)


def test_generate_without_cache_matches_transformers() -> None:
    ref, ours = _pair("gpt_oss")
    ids = _prompt(seed=3)
    want = _greedy(ref, ids, use_cache=False).sequences
    got = _greedy(ours, ids, use_cache=False)
    assert torch.equal(got.sequences, want)
    assert got.cache is None


def test_cached_forward_continues_a_prompt_like_a_full_forward() -> None:
    """Two new tokens at once after a cached prompt (a chunk, not one token): same logits as transformers' full pass."""
    ref, ours = _pair("mixtral")
    ids = _prompt(seed=4, seq=9)
    cache = DynamicCache(config=ours.config)
    ours(input_ids=ids[:, :7], cache=cache, use_cache=True)
    out = ours(input_ids=ids[:, 7:], cache=cache, use_cache=True)
    full = ref(input_ids=ids, use_cache=False).logits
    assert out.cache is cache and cache.get_seq_length() == 9
    assert max_abs(out.logits, full[:, 7:]) < 1e-5


# ---------------------------------------------------------------- save_pretrained


def _saved(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


@pytest.mark.parametrize(
    ("model_type", "dtype"), [(mt, torch.float32) for mt in VERIFIED] + [("deepseek_v3", None), ("olmoe", None)]
)
def test_save_pretrained_writes_what_transformers_writes(tmp_path: Path, model_type: str, dtype: torch.dtype | None) -> None:
    """A bundled checkpoint (bf16, fp16 or fp32 on disk) loaded by both in `dtype` (None: as on disk) and saved."""
    src = fixture_path(model_type)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype or "auto")
    ours = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device="cpu")
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    assert _saved(tmp_path / "ours", "config.json")["dtype"] == _saved(tmp_path / "ref", "config.json")["dtype"]
    assert _saved(tmp_path / "ours", "generation_config.json") == _saved(tmp_path / "ref", "generation_config.json")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype="auto")
    assert back.dtype == ref.dtype
    ids = torch.randint(3, ref.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    assert max_abs(back(input_ids=ids).logits, ref(input_ids=ids).logits) == 0.0


def test_save_pretrained_of_a_new_model_writes_its_dtype_and_generation_config(tmp_path: Path) -> None:
    """A model built by `from_config` (no checkpoint): config and generation config as transformers derives them."""
    ref, ours = _pair("qwen3_moe")
    ours.cast(torch.bfloat16)
    ref.to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    assert _saved(tmp_path / "ours", "config.json")["dtype"] == "bfloat16"
    assert _saved(tmp_path / "ours", "generation_config.json") == _saved(tmp_path / "ref", "generation_config.json")
