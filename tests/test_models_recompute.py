"""`BackendConfig(expert_recompute=True)`: the experts rebuild their gathered rows and their activation in backward.

Checked against the same module keeping them (the reference autograd graph): outputs and every gradient are equal
bit for bit (both layouts, fp32 and bf16, one rank and the all-to-all dispatcher on 2 gloo ranks), and an outer
`saved_tensors_hooks` (how torch's own CPU offload sees a graph) no longer receives the two tensors: the bytes it
is handed drop by exactly `S x H + S x I` elements. A trainer run gives the same losses; with `--ac` or
`--cuda-graphs` the option is refused in one line.
"""

from __future__ import annotations

import os

import pytest
import torch

from automodel_convert.models.backend import as_backend
from automodel_convert.models.common.experts import GroupedExperts

from spawn_ranks import init_gloo, run_ranks

T, H, I, E, K = 24, 32, 16, 8, 2  # H and I keep grouped_mm's 16-byte row alignment in fp32 and bf16


def _experts(layout: str, recompute: bool, dtype: torch.dtype, num_experts: int = E, lo: int = 0) -> GroupedExperts:
    g = torch.Generator().manual_seed(3)
    mod = GroupedExperts(E, H, I, layout=layout, impl="grouped_mm", recompute=recompute)
    for name, p in mod.named_parameters():
        full = torch.randn((E, *p.shape[1:]), generator=g) * 0.2
        setattr(mod, name, torch.nn.Parameter(full[lo : lo + num_experts].to(dtype)))
    return mod


def _inputs(dtype: torch.dtype, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_(True)
    w, idx = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
    return x, idx, w.to(dtype).requires_grad_(True)


def _run(mod: GroupedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, hooks=None) -> dict:
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    if hooks is None:
        y = mod(x, idx, w)
    else:
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            y = mod(x, idx, w)
    y.float().square().sum().backward()
    grads = {f"d_{n}": p.grad for n, p in mod.named_parameters()}
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad, **grads}


@pytest.mark.parametrize("layout", ["concat", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_gives_bit_identical_outputs_and_gradients(layout, dtype):
    x, idx, w = _inputs(dtype)
    keep = _run(_experts(layout, False, dtype), x, idx, w)
    rebuilt = _run(_experts(layout, True, dtype), x, idx, w)
    for k, v in keep.items():
        assert torch.equal(rebuilt[k], v), k
    assert keep["d_gate_up_proj"].abs().sum() > 0  # gradients flowed


def _saved_bytes_hooks():
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    return seen, (pack, lambda t: t)


@pytest.mark.parametrize("layout", ["concat", "gpt_oss"])
def test_the_gathered_rows_and_the_activation_are_no_longer_saved(layout):
    """An outer hook sees every tensor the graph keeps: with recompute, exactly the [S, H] rows and the [S, I]
    activation are missing (the rebuilt ones come back in backward, and the gradients still match)."""
    x, idx, w = _inputs(torch.float32)
    seen_keep, hooks_keep = _saved_bytes_hooks()
    seen_rebuilt, hooks_rebuilt = _saved_bytes_hooks()
    keep = _run(_experts(layout, False, torch.float32), x, idx, w, hooks_keep)
    rebuilt = _run(_experts(layout, True, torch.float32), x, idx, w, hooks_rebuilt)
    rows = T * K
    assert sum(seen_keep.values()) - sum(seen_rebuilt.values()) == (rows * H + rows * I) * 4
    assert all(torch.equal(rebuilt[k], v) for k, v in keep.items())


def test_a_source_modified_in_place_is_refused_not_silently_used():
    mod = _experts("concat", True, torch.float32)
    x, idx, w = _inputs(torch.float32)
    y = mod(x, idx, w)
    with torch.no_grad():
        x.add_(1.0)  # the dispatcher's compact source (x itself on one rank) changes after forward
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def _ep_worker(rank: int, world: int) -> dict:
    from automodel_convert.parallel.ep_dispatch import AllToAllDispatcher, expert_bounds

    init_gloo()
    lo, hi = expert_bounds(E, world)[rank : rank + 2]
    x, idx, w = _inputs(torch.float32, seed=10 + rank)
    out = {}
    for recompute in (False, True):
        mod = _experts("concat", recompute, torch.float32, num_experts=hi - lo, lo=lo)
        mod.dispatcher = AllToAllDispatcher(E, None)
        out[recompute] = _run(mod, x, idx, w)
    return out


def test_recompute_under_the_alltoall_dispatcher_on_two_ranks_is_bit_identical():
    for rank, res in enumerate(run_ranks(_ep_worker, 2)):
        for k, v in res[False].items():
            assert torch.equal(res[True][k], v), (rank, k)


@pytest.mark.parametrize("fixture", ["deepseek_v3", "qwen2_moe", "mixtral"])
def test_trainer_losses_are_unchanged_on_zoo_families(fixture):
    """Shared experts and MLA (deepseek_v3), a gated shared expert (qwen2_moe), a plain router (mixtral): the
    same losses, step for step, with and without `expert_recompute`."""
    from automodel_convert.train import TrainArgs, Trainer

    from conftest import FIXTURES

    common = dict(model=str(FIXTURES / fixture), seq=16, steps=3, lr=1e-2, dtype="float32", device="cpu", quiet=True)
    base = [m["loss"] for m in Trainer(TrainArgs(**common)).run()]
    rebuilt = [m["loss"] for m in Trainer(TrainArgs(**common, backend="expert_recompute=1")).run()]
    assert rebuilt == base and base[-1] != base[0], (base, rebuilt)


def test_backend_string_and_trainer(tmp_path, capsys):
    """`--backend expert_recompute=1` trains the same losses as without it; with --ac it is refused in one line."""
    import transformers

    from automodel_convert.train import TrainArgs, Trainer
    from automodel_convert.train.cli import main

    assert as_backend("expert_recompute=1").expert_recompute and not as_backend("expert_recompute=0").expert_recompute
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "m")
    common = dict(model=str(tmp_path / "m"), seq=16, steps=3, lr=1e-2, dtype="float32", device="cpu", quiet=True)
    base = [m["loss"] for m in Trainer(TrainArgs(**common)).run()]
    rebuilt = [m["loss"] for m in Trainer(TrainArgs(**common, backend="expert_recompute=1")).run()]
    assert rebuilt == base and base[-1] != base[0]
    os.environ.setdefault("WORLD_SIZE", "1")
    argv = ["--model", str(tmp_path / "m"), "--seq", "16", "--steps", "1", "--dtype", "float32", "--device", "cpu", "--ac",
            "--backend", "expert_recompute=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "expert_recompute" in err and "--ac" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
