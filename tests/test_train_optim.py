"""`OverlappedAdamW` (`train/optim.py`, AdamW stepped inside backward) against one `torch.optim.AdamW` over all parameters.

Reference: the same model, same batches, stepped by torch's AdamW after backward. After several steps every parameter
and both AdamW moments must be bit-identical (the per-parameter update is the same kernel on the same numbers); the
gradients must be gone after backward; a learning-rate change through `param_groups` must take effect; and the
`state` view must read and write like `Optimizer.state`. The CUDA side-stream path runs in the same test on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from automodel_convert.train.optim import OverlappedAdamW, input_side_modules

from conftest import fixture_path

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(device: str) -> torch.nn.Module:
    from automodel_convert.models import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(fixture_path("qwen3_moe"), dtype=torch.float32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("defer", [False, True], ids=["in-backward", "first-layers-deferred"])
def test_matches_adamw_bit_for_bit(device: str, fused: bool, defer: bool) -> None:
    ref_model = tiny_model(device)
    model = copy.deepcopy(ref_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), fused=fused, foreach=False if fused else None, **kw)
    opt = OverlappedAdamW(model.parameters(), fused=fused, **kw)
    deferred: set = set()
    if defer:
        mods = input_side_modules(model, layers=1)
        opt.defer_until_forward(mods)
        deferred = {id(p) for m in mods for p in m.parameters()}
        assert deferred and len(deferred) < len(list(model.parameters()))
    gen = torch.Generator().manual_seed(1)
    vocab = ref_model.config.vocab_size
    for step in range(4):
        ids = torch.randint(0, vocab, (2, 12), generator=gen).to(device)
        if step == 2:  # a schedule's lr change through param_groups, as the trainer does it
            for g in ref_opt.param_groups + opt.param_groups:
                g["lr"] = 1e-3
        ref_model(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        kept = [id(p) for p in model.parameters() if p.grad is not None]
        assert set(kept) <= deferred, "in-backward updates must free their gradients"
        assert bool(kept) == defer, "deferred parameters keep their gradients until step()"
        opt.step()
        assert all(p.grad is None for p in model.parameters())
        opt.zero_grad()
    opt.finish()
    names = dict(ref_model.named_parameters())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(names) // 2, "most parameters must move: the updates never ran"
    for n, p in model.named_parameters():
        r = names[n]
        assert torch.equal(p, r), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k].cpu(), ref_opt.state[r][k].cpu()), (n, k)


def test_state_view_and_errors() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = OverlappedAdamW([a, b], lr=0.1)
    assert len(opt.state) == 0 and len(opt.param_groups) == 2
    (a.sum() * 2).backward()  # only `a` gets a gradient: only `a` is stepped
    opt.step()
    assert list(opt.state) == [a] and a.grad is None and torch.all(a < 1) and torch.equal(b, torch.ones(2))
    saved = {k: v.clone() for k, v in opt.state[a].items()}
    opt.state[b] = {k: v.clone()[:2] if v.dim() else v.clone() for k, v in saved.items()}
    assert set(opt.state) == {a, b}
    with pytest.raises(KeyError):
        opt.state[torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="same parameter twice"):
        OverlappedAdamW([a, a])
    opt.remove_hooks()
    (a.sum()).backward()
    assert a.grad is not None, "hooks removed: backward leaves the gradient"


def test_model_and_optimizer_are_freed() -> None:
    """The hooks must not keep the optimizer (and through it every parameter and moment) alive."""
    import gc
    import weakref

    model = torch.nn.Linear(4, 3)
    opt = OverlappedAdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(model.weight)]
    del model, opt
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream and its events need CUDA")
def test_deferred_module_not_called_by_forward_raises() -> None:
    """A deferred module whose weights the forward reads without calling it would race with its update: loud error."""
    lin = torch.nn.Linear(8, 8, device="cuda")
    opt = OverlappedAdamW(lin.parameters(), lr=0.1)
    opt.defer_until_forward([lin])
    x = torch.ones(2, 8, device="cuda")
    for i in range(2):
        torch.nn.functional.linear(x, lin.weight, lin.bias).sum().backward()  # bypasses lin's forward pre-hook
        if i == 0:
            opt.step()
    with pytest.raises(RuntimeError, match="did not wait for their updates"):
        opt.step()
