"""Padded expansion of received tokens (`expand_received(num_pairs=None)`, what `deepep_static` runs on): the rows
are sized for the worst case with no host sync, and the padding must change nothing.

Reference: the same received tokens expanded with the pair count known on the host (what `deepep` and the all-to-all
dispatcher run on). Outputs and the gradients of the received rows, their routing weights and the expert weights
must be bit-identical, while padding tokens (all ids -1) hold NaN rows and NaN weights, as DeepEP's uninitialised
worst-case buffers may. The received-token side of a dispatcher is simulated on one CPU process: `dispatch` takes
the received rows, local ids and weights directly.
"""

from __future__ import annotations

import pytest
import torch

from automodel_convert.models.common.dispatch import TokenDispatcher, expand_received, sum_slots
from automodel_convert.models.common.experts import GroupedExperts

R, PAD, H, I, E_LOCAL, K = 48, 16, 32, 16, 4, 8


class _Received(TokenDispatcher):
    """`dispatch(recv_x, recv_idx, recv_w)`: rows that already arrived; `padded` expands them with no pair count."""

    name = "received"

    def __init__(self, padded: bool) -> None:
        self.padded = padded

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):  # noqa: ANN201
        num_pairs = None if self.padded else int((indices >= 0).sum())
        return expand_received(x, indices, weights, E_LOCAL, num_pairs)

    def combine(self, y: torch.Tensor, routed) -> torch.Tensor:  # noqa: ANN001
        return sum_slots(y, routed.state)


def _received(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R real tokens (each with some of its k experts here, ids < E_LOCAL, the rest -1) then PAD padding tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R + PAD, H, generator=g)
    idx = torch.randint(0, E_LOCAL, (R + PAD, K), generator=g)
    idx[torch.rand(R + PAD, K, generator=g) < 0.6] = -1  # experts on other ranks
    idx[3] = -1  # a real token with no local expert (it still comes back, as zeros)
    w = torch.rand(R + PAD, K, generator=g)
    idx[R:] = -1
    x[R:] = float("nan")
    w[R:] = float("nan")
    return x, idx, w


def _run(padded: bool, recompute: bool, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """On CUDA: bf16, Triton SwiGLU, and the fused gathers (an empty slot read as zeros inside the kernel)."""
    torch.manual_seed(0)
    cuda = device == "cuda"
    mod = GroupedExperts(E_LOCAL, H, I, impl="grouped_mm", recompute=recompute, swiglu_impl="triton" if cuda else "torch")
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, 0.1)
        mod.down_proj.normal_(0, 0.1)
    dtype = torch.bfloat16 if cuda else torch.float32
    mod.to(device, dtype)
    mod.dispatcher = _Received(padded)
    x, idx, w = (t.to(device) for t in _received(seed))
    x, w = x.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)
    out = mod(x, idx, w)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    (out[:R] * g[:R]).sum().backward()
    return {"out": out[:R], "dx": x.grad[:R], "dw": w.grad[:R], "d_gate_up": mod.gate_up_proj.grad, "d_down": mod.down_proj.grad}


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_padded_rows_give_bit_identical_outputs_and_gradients(recompute, seed, device):
    exact, padded = _run(False, recompute, seed, device), _run(True, recompute, seed, device)
    for key, ref in exact.items():
        assert torch.isfinite(padded[key]).all(), key
        assert torch.equal(padded[key], ref), key
    assert exact["out"][3].abs().sum() == 0  # a token with no local expert comes back as zeros


def test_padding_rows_lie_past_the_last_offset_with_zero_weight():
    x, idx, w = _received(3)
    routed = expand_received(x, idx, w, E_LOCAL, None)
    pairs = int((idx >= 0).sum())
    assert routed.padded and routed.x.shape[0] == (R + PAD) * K
    assert int(routed.offsets[-1]) == pairs
    assert torch.equal(routed.weights[pairs:], torch.zeros_like(routed.weights[pairs:]))
    assert int(routed.expert_ids.max()) < E_LOCAL  # in range for per-expert biases
    exact = expand_received(x, idx, w, E_LOCAL, pairs)
    assert torch.equal(routed.x[:pairs], exact.x) and torch.equal(routed.offsets, exact.offsets)


def test_experts_that_cannot_skip_padding_refuse_it():
    mod = GroupedExperts(E_LOCAL, H, I, impl="loop")
    mod.dispatcher = _Received(True)
    x, idx, w = _received(4)
    with pytest.raises(ValueError, match="pads its rows"):
        mod(x, idx, w)


def test_deepep_static_without_a_token_bound_is_one_line(monkeypatch):
    """Its buffers are sized from the tokens per rank; without that bound it refuses before touching DeepEP."""
    from automodel_convert.parallel import ep_dispatch

    monkeypatch.setattr(ep_dispatch, "deepep_available", lambda: True)
    with pytest.raises(ep_dispatch.DispatcherError, match="needs the tokens per rank") as e:
        ep_dispatch.make_dispatcher("deepep_static", 8, None, None)
    assert "\n" not in str(e.value)
    assert ep_dispatch.choose_dispatcher("deepep_static", 2, "cuda") == "deepep_static"
    with pytest.raises(ep_dispatch.DispatcherError, match="CUDA GPUs only"):
        ep_dispatch.choose_dispatcher("deepep_static", 2, "cpu")
