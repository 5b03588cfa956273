"""The expert-parallel experts path on a GPU (marked `gpu`; run on the device, skipped in CI).

The dispatcher path the EP trainer uses (sort by expert, [all-to-all], the zoo's grouped GEMM + Triton SwiGLU on the
local experts, combine with fp32 accumulation) against a float32 per-expert loop: forward and gradients (input,
gate_up_proj, down_proj) within bf16 tolerance, with the local dispatcher and with the NCCL all-to-all dispatcher
on a one-rank group; and `expert_recompute` on these kernels, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from automodel_convert.models.backend import has_package

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not has_package("triton"), reason="needs triton"),
]


def _experts(impl: str, swiglu_impl: str, dtype: torch.dtype, E: int = 16, H: int = 256, I: int = 128):  # noqa: E741
    from automodel_convert.models.common.experts import GroupedExperts

    torch.manual_seed(0)
    mod = GroupedExperts(E, H, I, impl=impl, swiglu_impl=swiglu_impl)
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, 0.05)
        mod.down_proj.normal_(0, 0.05)
    return mod.to("cuda", dtype)


def _inputs(T: int = 512, H: int = 256, E: int = 16, k: int = 4):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, H, device="cuda", generator=g)
    idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, device="cuda", generator=g), -1)
    return x, idx, w


def _run(mod, dispatcher, x, idx, w):  # noqa: ANN001, ANN202
    mod.dispatcher = dispatcher  # expert parallelism swaps the dispatcher; the experts' forward stays the same
    x = x.clone().requires_grad_(True)
    out = mod(x, idx, w.to(x.dtype))
    out.float().square().sum().backward()
    return out.float(), x.grad.float(), mod.gate_up_proj.grad.float(), mod.down_proj.grad.float()


def _reference(x, idx, w):  # noqa: ANN001, ANN202
    mod = _experts("loop", "torch", torch.float32)
    x = x.clone().requires_grad_(True)
    out = mod(x, idx, w)
    out.square().sum().backward()
    return out, x.grad, mod.gate_up_proj.grad, mod.down_proj.grad


def _close(got, ref) -> None:  # noqa: ANN001
    for a, b, name in zip(got, ref, ("out", "dx", "d_gate_up", "d_down")):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 2e-2 * scale + 1e-3, name


def test_local_dispatcher_grouped_path_matches_fp32_loop():
    from automodel_convert.models.common.dispatch import LocalDispatcher

    x, idx, w = _inputs()
    mod = _experts("grouped_mm", "triton", torch.bfloat16)
    _close(_run(mod, LocalDispatcher(16, "triton"), x.bfloat16(), idx, w), _reference(x, idx, w))


def test_alltoall_dispatcher_on_one_nccl_rank_matches_fp32_loop():
    import torch.distributed as dist

    from automodel_convert.parallel.ep_dispatch import AllToAllDispatcher

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x, idx, w = _inputs()
        mod = _experts("grouped_mm", "triton", torch.bfloat16)
        _close(_run(mod, AllToAllDispatcher(16, dist.group.WORLD), x.bfloat16(), idx, w), _reference(x, idx, w))
    finally:
        dist.destroy_process_group()


def test_expert_recompute_is_bit_identical_on_the_gpu_kernels():
    """grouped_mm + the Triton SwiGLU, bf16: rebuilding the gathered rows and the activation in backward
    (`expert_recompute`) gives the same output and gradients, bit for bit, as keeping them."""
    from automodel_convert.models.common.dispatch import LocalDispatcher

    x, idx, w = _inputs()
    runs = []
    for recompute in (False, True):
        mod = _experts("grouped_mm", "triton", torch.bfloat16)
        mod.recompute = recompute
        runs.append(_run(mod, LocalDispatcher(16, "triton"), x.bfloat16(), idx, w))
    for a, b, name in zip(*runs, ("out", "dx", "d_gate_up", "d_down")):
        assert torch.equal(a, b), name
