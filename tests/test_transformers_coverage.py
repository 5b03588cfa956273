"""Coverage follows transformers: every model type with fused experts in the installed transformers, end to end.

The types come from walking transformers' own registry (`fused_expert_types`: modeling files that declare
`@use_experts_implementation`), keeping those whose model holds fused-expert parameters. For each type a tiny model
is built from transformers' own class (`tests/tiny_transformers.py`) and written with `save_pretrained`; then:
- `merge` equals the model's state dict bit for bit (tied weights excepted: transformers does not store them);
- transformers loads the merged folder with no missing, unexpected or mismatched keys and gives the same logits;
- `split` of the merged folder is byte-identical to what transformers wrote;
- `verify` passes on both folders.
The mapping used is the one `get_mapping` returns: hand-written where a family exists, else the translation of
transformers' declared conversions. A type fails by name; xfail only where transformers itself cannot build, save or
run the tiny model (the reason says which). Every type transformers builds with fused experts is collected except
those in `STILL_REFUSED` (each with why), and the refused types must be exactly those: a new refusal fails here.
One declared exception to "merge equals the state dict": a tensor the mapping keeps as stored (`kept_as_stored`,
e.g. inkling2's padded `lm_head.weight`) is compared on the rows transformers' model holds.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_transformers import tiny_config, tiny_model

from automodel_convert.convert import merge, split, verify
from automodel_convert.convert.catalog import unsupported_rows
from automodel_convert.convert.registry import get_mapping, registry
from automodel_convert.convert.transformers_mapping import (
    fused_expert_types,
    is_fused_experts,
    try_generic_mapping,
)

from conftest import fixture_path, folder_bytes, folder_tensors


@functools.cache
def _has_fused_experts(model_type: str, class_name: str) -> bool | str:
    """Whether transformers' model of the type holds fused experts, or the reason transformers cannot build it.

    The tiny config is tried first (fast, on the meta device); when it builds without experts the default config is
    asked too, so a tiny config that lost the MoE layers is collected (and fails), never skipped."""
    import transformers

    cls = getattr(transformers, class_name)
    errors = []
    for make in (lambda: tiny_config(model_type), lambda: transformers.AutoConfig.for_model(model_type)):
        try:
            with torch.device("meta"):
                model = cls._from_config(make())
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[-1][:100] if str(e) else ''}")
            continue
        if any(is_fused_experts(m) for m in model.modules()):
            return True
    if len(errors) == 2:
        return f"transformers cannot build {class_name} from its default config nor a shrunk one ({'; '.join(errors)})"
    return False


def _supported(model_type: str) -> bool:
    return model_type in registry() or try_generic_mapping(model_type)[0] is not None


# transformers types with fused experts that stay refused, and a word of the reason their refusal gives
STILL_REFUSED: dict[str, str] = {}


def _types() -> list:
    """Every transformers type with fused experts but `STILL_REFUSED` (xfail where transformers cannot build it); an
    unsupported one is collected too, so it fails by name."""
    out = []
    refused = set(_refused_types())
    for mt, cls in fused_expert_types().items():
        if cls is None or mt in STILL_REFUSED or not (_supported(mt) or mt in refused):
            continue
        has = _has_fused_experts(mt, cls)
        if isinstance(has, str):
            out.append(pytest.param(mt, cls, marks=pytest.mark.xfail(reason=has, strict=True), id=mt))
        elif has:
            out.append(pytest.param(mt, cls, id=mt))
    return out


def _refused_types() -> list[str]:
    """transformers types with fused experts whose declared conversions have no exact translation here."""
    return [row["model_type"] for row in unsupported_rows()]  # the same list as docs/MODELS.md




def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    if type(model).__name__ == "Llama4ForConditionalGeneration":
        # transformers 5.24's text-only forward of this class reads `image_outputs` from a text output and crashes;
        # its language model (the same weights) gives the logits
        model = model.language_model
    torch.manual_seed(0)  # diffusion_gemma draws a random canvas when none is given: the same one for both models
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _save(model_type: str, class_name: str, root: Path):
    try:
        model = tiny_model(model_type, class_name)
        model.save_pretrained(root / "src")
    except Exception as e:
        pytest.xfail(f"transformers cannot build or save the tiny {class_name}: {type(e).__name__}: {e}"[:300])
    return model


@pytest.mark.parametrize(("model_type", "class_name"), _types())
def test_round_trip_against_transformers(model_type: str, class_name: str, tmp_path: Path) -> None:
    import transformers

    model = _save(model_type, class_name, tmp_path)
    assert any(is_fused_experts(m) for m in model.modules()), "the tiny config has no MoE layer"
    src, fused, back = tmp_path / "src", tmp_path / "fused", tmp_path / "back"
    merge(src, fused)

    expected = model.state_dict()
    ours = folder_tensors(fused)
    tied = set(expected) - set(ours)
    assert set(ours) <= set(expected), sorted(set(ours) - set(expected))[:5]
    for k in tied:  # tied weights are not stored: each equals a stored tensor
        assert any(expected[k].data_ptr() == expected[n].data_ptr() for n in ours), f"{k} is neither merged nor tied"
    kept = _kept_rows(model_type, model, ours)
    for k, v in ours.items():
        if k in kept:  # stored padded; transformers' model holds the first rows (it drops the rest on load)
            v = v[: kept[k]]
        assert v.dtype == expected[k].dtype and v.shape == expected[k].shape, k
        assert torch.equal(v, expected[k]), k

    split(fused, back)
    assert folder_bytes(back) == folder_bytes(src)
    assert verify(src).ok and verify(fused).ok

    cls = getattr(transformers, class_name)
    loaded, info = cls.from_pretrained(fused, dtype=torch.float32, output_loading_info=True)
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[what], (what, sorted(map(str, info[what]))[:5])
    reference = cls.from_pretrained(src, dtype=torch.float32).eval()  # transformers reading its own save
    got, want = loaded.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:5]
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    try:
        ref = _logits(reference, ids)
    except Exception as e:
        pytest.xfail(f"transformers' tiny {class_name} has no text-only forward: {type(e).__name__}: {e}"[:300])
    # same weights; the kernels may round differently on differently laid-out (but equal) inputs
    torch.testing.assert_close(_logits(loaded.eval(), ids), ref, rtol=0, atol=1e-5)


def _kept_rows(model_type: str, model, ours: dict) -> dict[str, int]:
    """Merged tensors the mapping declares kept as stored (`kept_as_stored`), with the rows transformers' model holds
    of each (the config field the declaration names): transformers drops the other rows on load and pads zeros back
    on save, which is not a bijection, so the merge keeps the stored tensor and transformers unpads it again when it
    loads the merge (its key keeps its name). The merged tensor must have more rows than that: else it is no
    exception."""
    out = {}
    for kept in get_mapping(model_type).kept_as_stored:
        rows = getattr(model.config.get_text_config(), kept.rows_field)
        for k in ours:
            if kept.template.match(k) is not None:
                assert ours[k].shape[0] > rows, (k, ours[k].shape, kept.rows_field, rows)
                out[k] = rows
    assert out or not get_mapping(model_type).kept_as_stored, "no merged tensor is the declared kept one"
    return out


def test_refused_types_are_the_declared_ones() -> None:
    """Coverage follows transformers: only `STILL_REFUSED` types are refused, each for its reason."""
    reasons = {row["model_type"]: row["reason"] for row in unsupported_rows()}
    assert set(reasons) == set(STILL_REFUSED), {mt: r[:200] for mt, r in reasons.items() if mt not in STILL_REFUSED}
    for mt, word in STILL_REFUSED.items():
        assert word in reasons[mt], (mt, reasons[mt][:300])


@pytest.mark.parametrize("model_type", _refused_types())
def test_untranslatable_type_is_refused_in_one_line(model_type: str, tmp_path: Path, run_cli) -> None:
    """No mapping is guessed: merge exits 2 with one line that says what transformers declares that we cannot invert."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, src / "model.safetensors")
    code, out, err = run_cli("merge", src, tmp_path / "dst")
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1, err
    assert try_generic_mapping(model_type)[1][:40] in " ".join(err.split())
    assert not (tmp_path / "dst").exists()


def test_split_uses_the_model_type_merge_recorded(tmp_path: Path) -> None:
    """`merge --model-type deepseek_v2` on a checkpoint whose config names another type: split needs no override."""
    src = tmp_path / "src"
    shutil.copytree(fixture_path("deepseek_v2"), src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "deepseek_ocr_unknown"
    (src / "config.json").write_text(json.dumps(config))
    merge(src, tmp_path / "fused", model_type="deepseek_v2")
    split(tmp_path / "fused", tmp_path / "back")
    assert folder_bytes(tmp_path / "back") == folder_bytes(src)
    assert verify(tmp_path / "fused").ok


def test_converter_the_default_model_never_uses_refuses_its_keys(tmp_path: Path, run_cli) -> None:
    """qwen4_exp is translated although transformers' n-gram shard converter has no exact inverse: the model built
    from its default config has no n-gram embedding. A checkpoint that has those keys is refused in one line."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen4_exp_text", "num_experts": 2}))
    tensors = {f"model.layers.0.mlp.experts.{e}.{p}.weight": torch.zeros(2, 2) for e in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    tensors["model.layers.0.ple.ple_embedding.ngram_embedding.shard_0.weight"] = torch.zeros(2, 2)
    save_file(tensors, src / "model.safetensors")
    code, out, err = run_cli("merge", src, tmp_path / "dst")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert "ngram_embedding.shard_0.weight" in err and "number is not in its shape" in " ".join(err.split())
    assert not (tmp_path / "dst").exists()


def test_rope_permutation_takes_its_heads_from_the_checkpoint_config() -> None:
    """transformers' PermuteForRope permutes within each head: the translated op reads the head count from the
    checkpoint's config.json, with transformers' defaults where the file leaves a value out, and equals transformers'
    own op both ways, bit for bit."""
    from transformers.core_model_loading import PermuteForRope

    (group,) = [g for g in try_generic_mapping("mistral_large4")[0].groups if g.fused.endswith("q_proj.weight")]
    (op,) = group.fused_ops
    default_heads = transformers_config("mistral_large4").vision_config.num_attention_heads
    assert op.bind_config({"model_type": "mistral_large4"}).heads == default_heads
    bound = op.bind_config({"model_type": "mistral_large4", "vision_config": {"num_attention_heads": 4}})
    assert bound.heads == 4
    x = torch.arange(32 * 3, dtype=torch.int32).reshape(32, 3)
    config = transformers_config("mistral_large4", vision_config={"num_attention_heads": 4})
    theirs = PermuteForRope(subconfig_key="vision_config")._permute_for_rope(x, config)
    (ours,) = bound.apply([x])
    assert torch.equal(ours, theirs)
    assert torch.equal(bound.inverse().apply([ours])[0], x)


def transformers_config(model_type: str, **kwargs):
    import transformers

    return transformers.AutoConfig.for_model(model_type, **kwargs)


def _ernie_vl_checkpoint(src: Path, experts: int, text_config: dict) -> None:
    """A one-layer ernie4_5_vl_moe checkpoint whose one expert list has `experts` entries (2x2 zeros each)."""
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "ernie4_5_vl_moe", "text_config": text_config}))
    names = ("gate_proj", "up_proj", "down_proj")
    tensors = {f"model.layers.1.mlp.experts.{e}.{p}.weight": torch.zeros(2, 2) for e in range(experts) for p in names}
    save_file(tensors, src / "model.safetensors")


@pytest.mark.parametrize(
    ("experts", "text_config", "says"),
    [
        (5, {"moe_num_experts": 2}, "expert index(es) [4] beyond num_experts=2"),  # 2 text + 2 vision + one more
        (3, {"moe_num_experts": 2}, "missing expert(s) [3]"),
        (4, {}, "config.json gives no moe_num_experts"),  # E tells the text experts from the vision ones
    ],
)
def test_ernie_vl_expert_list_that_does_not_fit_the_config_is_refused(
    experts: int, text_config: dict, says: str, tmp_path: Path, run_cli
) -> None:
    """ernie4_5_vl_moe's one on-disk expert list is E text experts, then E vision experts (E: the config's
    moe_num_experts): a list of another length, or no E, is refused in one line naming the on-disk index."""
    _ernie_vl_checkpoint(tmp_path / "src", experts, text_config)
    code, out, err = run_cli("merge", tmp_path / "src", tmp_path / "dst")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert says in err, err
    assert not (tmp_path / "dst").exists()


def test_ernie_vl_dry_run_tells_text_from_vision_experts(tmp_path: Path) -> None:
    """Key coverage (names only) routes each on-disk expert index to its stack: E text experts, then E vision; an
    index past both is a problem named by its on-disk index."""
    from automodel_convert.convert.inspection import inspect_dry_run

    _ernie_vl_checkpoint(tmp_path / "src", 4, {"moe_num_experts": 2})
    report = inspect_dry_run(tmp_path / "src")
    assert report["complete"], report["problems"]
    rows = {row["fused"].removeprefix("{prefix}"): (row["experts"], row["keys"]) for row in report["groups"]}
    assert rows == {f"{s}_moe.experts.{f}": (2, 2 * n) for s in ("text", "vision") for f, n in (("gate_up_proj", 2), ("down_proj", 1))}
    _ernie_vl_checkpoint(tmp_path / "more", 5, {"moe_num_experts": 2})
    problems = inspect_dry_run(tmp_path / "more")["problems"]
    assert len(problems) == 2 and all("vision_moe" in p and "experts [4] beyond num_experts=2" in p for p in problems), problems


def test_inkling2_loop_quantized_experts_are_refused_in_one_line(tmp_path: Path, run_cli) -> None:
    """transformers dequantizes Inkling2Loop's NVFP4/MXFP8 experts on load, which is not reversible: the unquantized
    weights it writes itself round-trip (test_round_trip_against_transformers), and a checkpoint that holds the
    scales is refused in one line, nothing written (it was a deinterleaved copy of the packed codes, exit 0)."""
    from safetensors.torch import load_file

    _save("inkling2_loop_text", "Inkling2LoopForCausalLM", tmp_path)
    src = tmp_path / "src"
    code, _, err = run_cli("merge", src, tmp_path / "plain", "-q")
    assert code == 0, err  # the type is supported: only the quantized form is refused
    tensors = load_file(src / "model.safetensors")
    w13 = next(k for k in tensors if k.endswith("experts.w13_weight"))
    tensors[w13 + "_scale"] = torch.zeros(*tensors[w13].shape[:2], 2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, out, err = run_cli("merge", src, tmp_path / "dst")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert "w13_weight_scale" in err and "not reversible bit for bit" in " ".join(err.split())
    assert not (tmp_path / "dst").exists()


def test_merge_does_not_call_renamed_tensors_an_unchanged_copy(tmp_path: Path) -> None:
    """Inkling2Loop's experts are fused on disk, but transformers renames every key (`model.llm.` -> `model.`) and
    converts its experts and message queries: merge must not say the tensors were copied through unchanged."""
    _save("inkling2_loop_text", "Inkling2LoopForCausalLM", tmp_path)
    res = merge(tmp_path / "src", tmp_path / "dst")
    assert not any("copied through unchanged" in n and "the rest" not in n for n in res.notes), res.notes
    assert any("renamed or converted" in n for n in res.notes), res.notes
    again = merge(tmp_path / "dst", tmp_path / "again")  # now nothing changes: the plain note
    assert any(n.endswith("tensors are copied through unchanged") for n in again.notes), again.notes
