"""The one record per model type (`convert.spec.ModelSpec`): every consumer reads it, and nothing is kept twice.

The zoo's classes, `VERIFIED`, expert-parallel refusals and E all come from the records; the "verified" status is
package data regenerated from fixtures/ (and equal to it); declarations are keyword-only.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil

import pytest
import torch

from automodel_convert.convert import verified
from automodel_convert.convert.catalog import catalog_rows
from automodel_convert.convert.mapping import ExpertGroup, MoEMapping
from automodel_convert.convert.registry import declared_spec, get_mapping, get_spec, specs
from automodel_convert.convert.spec import ModelSpec
from automodel_convert.models import VERIFIED, MoECausalLM, get_model_class, zoo_types

from conftest import FIXTURES, ROOT


def test_shipped_verified_status_equals_the_fixtures():
    """convert/verified.json (package data) is what fixtures/ says; stale: catalog --write regenerates it."""
    fresh = verified.from_fixtures(FIXTURES)
    assert fresh, "fixtures/manifest.json lists no fixture"
    assert verified.SHIPPED.read_text() == verified.render(fresh), (
        "convert/verified.json is stale: python -m automodel_convert.convert.catalog --write docs/MODELS.md"
    )
    assert verified.verified() == fresh


def test_status_does_not_read_the_repository(monkeypatch, tmp_path):
    """An installed wheel has no fixtures/: the catalog's status is the same without it."""
    before = catalog_rows()
    monkeypatch.setattr(verified, "FIXTURES", tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    verified.verified.cache_clear()
    assert catalog_rows() == before
    assert sum(r["verified"].startswith("verified") for r in before) == len(verified.from_fixtures(FIXTURES))


def test_verified_json_is_package_data():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "verified.json" in cfg["tool"]["setuptools"]["package-data"]["automodel_convert.convert"]
    assert verified.SHIPPED.parent == ROOT / "convert"


def _zoo_classes() -> dict[str, type]:
    """Every MoECausalLM subclass defined in a module of models/ (none is registered anywhere by hand)."""
    from automodel_convert import models

    found = {}
    for info in pkgutil.iter_modules(models.__path__):
        mod = importlib.import_module(f"{models.__name__}.{info.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, MoECausalLM) and cls is not MoECausalLM and cls.__module__ == mod.__name__:
                found[f"{cls.__module__}.{cls.__name__}"] = cls
    return found


def test_every_zoo_class_is_named_by_its_record():
    classes = _zoo_classes()
    named = {spec.zoo: name for name, spec in specs().items() if spec.zoo}
    assert set(classes) == set(named), "a zoo class without a record, or a record naming no class"
    for path, mt in named.items():
        assert get_model_class(mt) is classes[path]
        assert classes[path].model_type == mt
    assert set(VERIFIED) == set(zoo_types()) == set(named.values())
    assert get_model_class("jamba") is None and get_model_class("no_such_type") is None


def test_ep_refusal_is_the_records():
    from automodel_convert.models.testing import tiny_config
    from automodel_convert.parallel.expert_parallel import ExpertParallelError, experts_modules

    why = declared_spec("gpt_oss").ep_unsupported
    assert why and [mt for mt in zoo_types() if specs()[mt].ep_unsupported] == ["gpt_oss"]
    with torch.device("meta"):
        model = get_model_class("gpt_oss")(tiny_config("gpt_oss"))
    with pytest.raises(ExpertParallelError, match=why):
        experts_modules(model)
    with torch.device("meta"):
        model = get_model_class("qwen3_moe")(tiny_config("qwen3_moe"))
    sparse = model.config.num_hidden_layers - len(model.config.mlp_only_layers)
    assert len(experts_modules(model)) == sparse


@pytest.mark.parametrize("model_type", zoo_types())
def test_num_experts_from_a_dict_or_a_config_object(model_type):
    from automodel_convert.models.testing import tiny_config

    config = tiny_config(model_type)
    spec = declared_spec(model_type)
    expected = next(getattr(config, f) for f in ("num_experts", "n_routed_experts", "num_local_experts") if hasattr(config, f))
    assert spec.num_experts(config) == spec.num_experts(config.to_dict()) == expected


def test_num_experts_under_a_text_config():
    config = json.loads((FIXTURES / "qwen3_vl_moe" / "config.json").read_text())
    assert get_spec("qwen3_vl_moe").num_experts(config) == config["text_config"]["num_local_experts"]
    assert get_spec("qwen3_omni_moe").num_experts(config) is None  # E per stack, from the keys


def test_translated_types_get_a_conversion_only_record():
    spec = get_spec("afmoe")
    assert isinstance(spec, ModelSpec) and spec.zoo is None and spec.ep_unsupported is None
    assert spec.mapping is get_mapping("afmoe") and declared_spec("afmoe") is None


def test_declarations_are_keyword_only():
    with pytest.raises(TypeError):
        MoEMapping("mixtral", "mixtral")  # the positional form is what kw_only forbids
    with pytest.raises(TypeError):
        ExpertGroup("a.fused", ("a.{expert}.w",))
    with pytest.raises(TypeError):
        ModelSpec(get_mapping("mixtral"))
    with pytest.raises(ValueError, match="dotted path"):
        ModelSpec(mapping=get_mapping("mixtral"), zoo="Mixtral")
