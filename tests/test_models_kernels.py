"""Triton kernels and the CUDA paths of the zoo, each against the plain torch computation.

Marked `gpu`: skipped without CUDA. `TRITON_INTERPRET=1` (with triton importable) runs the kernel tests on the CPU
through Triton's interpreter instead.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from automodel_convert.models import BackendConfig, get_model_class
from automodel_convert.models.backend import has_package
from automodel_convert.models.common.loss import causal_lm_loss
from automodel_convert.models.common.norms import rms_norm_reference
from automodel_convert.models.testing import VOCAB, grad_diffs, max_abs, tiny_hf_model

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_package("triton"), reason="needs triton"),
    pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA (or TRITON_INTERPRET=1)"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="model paths need CUDA")


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """fp32: tight; bf16: a few units in the last place of bf16, relative to the size of the values."""
    a, b = a.float(), b.float()
    if dtype == torch.float32:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    return torch.allclose(a, b, rtol=2e-2, atol=1e-3 * max(1.0, b.abs().max().item()))


def no_worse(kernel: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor) -> bool:
    """The kernel is at least about as accurate as torch in the same dtype, both measured against fp32 math."""
    err_k = (kernel.float() - truth).abs().max().item()
    err_t = (torch_same_dtype.float() - truth).abs().max().item()
    return err_k <= 2 * err_t + 1e-5 * max(1.0, truth.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 17, 64), (5, 4, 2, 128), (9, 2048)])
def test_rms_norm_kernel(dtype: torch.dtype, shape: tuple) -> None:
    from automodel_convert.models.common.kernels import rms_norm

    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest")
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEV)).to(dtype).requires_grad_()
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y, yr, y32 = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), rms_norm_reference(x32, w32, 1e-6)
    assert no_worse(y, yr, y32.detach())
    dy = torch.randn_like(y)
    got, want = torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(yr, (x, w), dy)
    truth = torch.autograd.grad(y32, (x32, w32), dy.float())
    for a, b, t in zip(got, want, truth):
        assert no_worse(a, b, t)


def test_rms_norm_kernel_on_no_rows_gives_a_zero_weight_gradient() -> None:
    """No rows, no program writes a partial sum: the weight's gradient is exactly 0, not uninitialised memory."""
    from automodel_convert.models.common.kernels import rms_norm

    x = torch.randn(0, 3, 64, device=DEV, requires_grad=True)
    w = torch.ones(64, device=DEV, requires_grad=True)
    for _ in range(3):  # reuse of freed (non-zero) allocations
        torch.randn(4096, device=DEV)
        dx, dw = torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), torch.randn(0, 3, 64, device=DEV))
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_swiglu_kernel(dtype: torch.dtype, weighted: bool) -> None:
    from automodel_convert.models.common.kernels import swiglu_weighted

    torch.manual_seed(1)
    h = torch.randn(67, 2 * 200, device=DEV, dtype=dtype, requires_grad=True)
    s = torch.rand(67, device=DEV, dtype=dtype, requires_grad=True) if weighted else None
    out = swiglu_weighted(h, s)
    g, u = h.float().chunk(2, dim=-1)
    ref = F.silu(g) * u * (s.float()[:, None] if weighted else 1.0)
    assert close(out, ref, dtype)
    dout = torch.randn_like(out)
    inputs = (h, s) if weighted else (h,)
    got, want = torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout.float())
    for a, b in zip(got, want):
        assert close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel(dtype: torch.dtype) -> None:
    from automodel_convert.models.common.kernels import cross_entropy_fwd_bwd

    torch.manual_seed(2)
    logits = (3 * torch.randn(13, 9001, device=DEV)).to(dtype)
    t = torch.randint(0, 9001, (13,), device=DEV)
    t[[1, 7]] = -100
    lf = logits.float().requires_grad_()
    ref = F.cross_entropy(lf, t, ignore_index=-100, reduction="sum") / 11
    ref.backward()
    loss, grad = cross_entropy_fwd_bwd(logits.clone(), t, torch.tensor(1 / 11, device=DEV), -100)
    assert abs(loss.sum().item() / 11 - ref.item()) < 1e-4
    assert torch.allclose(grad.float(), lf.grad, atol=1e-6 if dtype == torch.float32 else 2e-3)
    loss_only, none = cross_entropy_fwd_bwd(logits.clone(), t, None, -100)
    assert none is None and torch.allclose(loss_only, loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_triton_vs_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    h = torch.randn(2, 37, 64, device=DEV, dtype=dtype, requires_grad=True)
    w = (0.05 * torch.randn(3001, 64, device=DEV)).to(dtype).requires_grad_()
    labels = torch.randint(0, 3001, (2, 37), device=DEV)
    labels[0, :5] = -100
    grads = {}
    for impl in ("triton", "chunked", "full"):
        loss = causal_lm_loss(h, w, labels, impl=impl, chunk_tokens=16)
        grads[impl] = (loss.detach(), *torch.autograd.grad(loss, (h, w)))
    for impl in ("triton", "chunked"):
        for a, b in zip(grads[impl], grads["full"]):
            assert close(a, b, dtype)


@needs_cuda
@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_cuda_fp32_model_matches_transformers(model_type: str) -> None:
    ref = tiny_hf_model(model_type).cuda()
    ours = get_model_class(model_type).from_config(ref.config, BackendConfig(), device="cuda", init=False)
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(3, VOCAB, (2, 13), device="cuda")
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out = ours(input_ids=ids, labels=ids, return_logits=True)
    assert max_abs(out.logits, out_ref.logits) < 1e-4  # TF32 may be on for matmuls on this device
    out_ref.loss.backward()
    out.loss.backward()
    assert max(grad_diffs(ref, ours).values()) < 1e-3


@needs_cuda
def test_cuda_bf16_fast_path_matches_torch_path() -> None:
    """grouped_mm + Triton SwiGLU/RMSNorm/rope/CE in bf16 is at least about as accurate as the torch kernels in bf16,
    both measured against the same weights in fp32 (routing flips near ties hit both alike)."""
    ref = tiny_hf_model("qwen3_moe", num_experts=16, moe_intermediate_size=64, hidden_size=128, head_dim=32)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # weights exactly representable in bf16
    models = {}
    for name, be in {
        "fast": BackendConfig(experts="grouped_mm", swiglu="triton", rms_norm="triton", loss="triton", rope="triton"),
        "torch": BackendConfig(experts="padded", swiglu="torch", rms_norm="torch", loss="full", rope="torch"),
        "fp32": BackendConfig(experts="padded", swiglu="torch", rms_norm="torch", loss="full", rope="torch"),
    }.items():
        m = get_model_class("qwen3_moe").from_config(ref.config, be, device="cuda", init=False)
        m.load_state_dict(ref.state_dict())
        models[name] = m if name == "fp32" else m.cast(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 64), device="cuda")
    losses = {k: m(input_ids=ids, labels=ids).loss for k, m in models.items()}
    assert abs(losses["fast"].item() - losses["fp32"].item()) <= 2 * abs(losses["torch"].item() - losses["fp32"].item()) + 1e-2
    for loss in losses.values():
        loss.backward()
    params = {k: dict(m.named_parameters()) for k, m in models.items()}
    for name, truth in params["fp32"].items():
        t = truth.grad.float()
        scale = t.norm() + 1e-12
        err_fast = ((params["fast"][name].grad.float() - t).norm() / scale).item()
        err_torch = ((params["torch"][name].grad.float() - t).norm() / scale).item()
        assert err_fast <= 2 * err_torch + 2e-2, (name, err_fast, err_torch)


@needs_cuda
def test_cuda_bf16_training_step_with_fused_adamw() -> None:
    """A few optimizer steps of the default (auto) back-end in bf16: finite, and the loss goes down."""
    from automodel_convert.models.testing import tiny_config

    model = get_model_class("qwen3_moe").from_config(
        tiny_config("qwen3_moe", vocab_size=512, hidden_size=128, head_dim=32, moe_intermediate_size=64),
        dtype=torch.bfloat16, device="cuda",
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    ids = torch.randint(3, 512, (2, 96), device="cuda")
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_sum_kernel(dtype: torch.dtype) -> None:
    from automodel_convert.models.common.kernels import gather_sum

    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest")
    torch.manual_seed(4)
    t, k, h = 37, 3, 200
    src = torch.randn(t * k, h, device=DEV).to(dtype)
    idx = torch.randperm(t * k, device=DEV)
    want = src.float().index_select(0, idx).view(t, k, h).sum(1)
    got = gather_sum(src, idx, k)
    ref_same_dtype = src.index_select(0, idx).view(t, k, h).sum(1)
    assert no_worse(got, ref_same_dtype, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_sum_reads_the_one_past_the_end_index_as_a_zero_row(dtype: torch.dtype) -> None:
    """Empty slots (index == len(src)) sum a zero row: bit-identical to appending one, as the EP gathers did."""
    from automodel_convert.models.common.kernels import gather_sum

    torch.manual_seed(6)
    t, k, h = 41, 4, 300
    src = torch.randn(t * 2, h, device=DEV).to(dtype)
    idx = torch.randint(0, t * 2, (t * k,), device=DEV)
    idx[torch.rand(t * k, device=DEV) < 0.3] = t * 2  # empty slots
    idx[:k] = t * 2  # a token with no rows at all
    padded = torch.cat([src, src.new_zeros(1, h)])
    got = gather_sum(src, idx, k)
    assert torch.equal(got, gather_sum(padded, idx, k))
    assert torch.equal(got[0], torch.zeros_like(got[0]))


@needs_cuda
def test_compiled_dense_parts_match_eager() -> None:
    from automodel_convert.models.testing import tiny_config

    cfg = tiny_config("qwen3_moe", vocab_size=512, hidden_size=128, head_dim=32, moe_intermediate_size=64)
    plain = get_model_class("qwen3_moe").from_config(cfg, dtype=torch.bfloat16, device="cuda")
    compiled = get_model_class("qwen3_moe").from_config(cfg, BackendConfig(compile=True), dtype=torch.bfloat16, device="cuda")
    compiled.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 512, (2, 64), device="cuda")
    a, b = plain(input_ids=ids, labels=ids).loss, compiled(input_ids=ids, labels=ids).loss
    assert abs(a.item() - b.item()) < 2e-2
    a.backward()
    b.backward()
    assert all(p.grad is not None for p in compiled.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "dim", "rotary"), [(4, 32, 32), (3, 24, 12)])
def test_rope_kernel(dtype: torch.dtype, heads: int, dim: int, rotary: int) -> None:
    from automodel_convert.models.common.kernels import rope_half
    from automodel_convert.models.common.rotary import apply_rotary

    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest")
    torch.manual_seed(5)
    b, s = 2, 19
    base = torch.randn(b, s, heads * dim + 8, device=DEV).to(dtype)
    x = base[..., : heads * dim].unflatten(-1, (heads, dim)).requires_grad_()  # strided input, like a fused qkv
    freqs = torch.rand(b, s, rotary // 2, device=DEV) * 6
    cos, sin = torch.cat([freqs.cos(), freqs.cos()], -1).to(dtype), torch.cat([freqs.sin(), freqs.sin()], -1).to(dtype)
    got = rope_half(x, cos, sin)
    same, _ = apply_rotary(x.transpose(1, 2), x.transpose(1, 2), cos, sin, "half")
    x32 = x.detach().float().requires_grad_()
    truth, _ = apply_rotary(x32.transpose(1, 2), x32.transpose(1, 2), cos.float(), sin.float(), "half")
    assert no_worse(got, same.transpose(1, 2), truth.transpose(1, 2).detach())
    dy = torch.randn_like(got)
    g_got = torch.autograd.grad(got, x, dy)[0]
    g_same = torch.autograd.grad(same.transpose(1, 2), x, dy)[0]
    g_truth = torch.autograd.grad(truth.transpose(1, 2), x32, dy.float())[0]
    assert no_worse(g_got, g_same, g_truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hk", "dim", "rotary"), [(4, 2, 32, 32), (3, 1, 24, 12), (8, 2, 128, 128)])
def test_qk_norm_rope_kernel_equals_the_separate_kernels(dtype: torch.dtype, hq: int, hk: int, dim: int, rotary: int) -> None:
    """One launch for both per-head norms and both rotations: values and every gradient (inputs and both norm
    weights) bit-identical to rms_norm then rope_half, the kernels it replaces; strided gradients as attention gives."""
    from automodel_convert.models.common.kernels import qk_norm_rope, rms_norm, rope_half

    torch.manual_seed(11)
    b, s, eps = 2, 37, 1e-6
    q = torch.randn(b, s, hq, dim, device=DEV).to(dtype).requires_grad_()
    k = torch.randn(b, s, hk, dim, device=DEV).to(dtype).requires_grad_()
    wq = (1 + 0.3 * torch.randn(dim, device=DEV)).to(dtype).requires_grad_()
    wk = (1 + 0.3 * torch.randn(dim, device=DEV)).to(dtype).requires_grad_()
    freqs = torch.rand(b, s, rotary // 2, device=DEV) * 6
    cos, sin = torch.cat([freqs.cos(), freqs.cos()], -1).to(dtype), torch.cat([freqs.sin(), freqs.sin()], -1).to(dtype)
    fused = qk_norm_rope(q, k, wq, wk, eps, cos, sin)
    separate = (rope_half(rms_norm(q, wq, eps), cos, sin), rope_half(rms_norm(k, wk, eps), cos, sin))
    for got, want in zip(fused, separate):
        assert torch.equal(got, want)
    # attention hands back gradients laid out [B, heads, S, D] transposed to [B, S, heads, D]
    dq = torch.randn(b, hq, s, dim, device=DEV).to(dtype).transpose(1, 2)
    dk = torch.randn(b, hk, s, dim, device=DEV).to(dtype).transpose(1, 2)
    inputs = (q, k, wq, wk)
    g_fused = torch.autograd.grad(fused, inputs, (dq, dk))
    g_separate = torch.autograd.grad(separate, inputs, (dq, dk))
    for name, got, want in zip(("q", "k", "q_norm.weight", "k_norm.weight"), g_fused, g_separate):
        assert torch.equal(got, want), name
    if INTERPRET and dtype == torch.bfloat16:
        return  # Triton's CPU interpreter truncates fp32 -> bf16: only the bit-equality above means anything there
    # and as accurate as the plain torch computation in the same dtype, both against fp32 math
    from automodel_convert.models.common.rotary import apply_rotary

    def torch_path(q, k, wq, wk, cos, sin):  # noqa: ANN001, ANN202
        qq, kk = apply_rotary(rms_norm_reference(q, wq, eps).transpose(1, 2), rms_norm_reference(k, wk, eps).transpose(1, 2), cos, sin, "half")
        return qq.transpose(1, 2), kk.transpose(1, 2)

    same = torch_path(q, k, wq, wk, cos, sin)
    truth = torch_path(*(t.detach().float() for t in (q, k, wq, wk, cos, sin)))
    for got, want_same, want in zip(fused, same, truth):
        assert no_worse(got, want_same, want)


@needs_cuda
def test_attention_fuses_qk_norm_and_rope_without_changing_a_bit() -> None:
    """A Qwen3 layer's attention (qk_norm "head", Triton norms and rope) takes the fused kernel; switching the fusion
    off changes no output and no gradient."""
    from automodel_convert.models.common import attention as attn_mod
    from automodel_convert.models.common.attention import GQAttention, Masks

    torch.manual_seed(3)
    layer = GQAttention(256, 4, 2, 64, qk_norm="head", norm_impl="triton", rope_impl="triton").to(DEV, torch.bfloat16)
    for norm in (layer.q_norm, layer.k_norm):
        norm.weight.data.normal_(1, 0.2)
    x = torch.randn(2, 33, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    freqs = torch.rand(2, 33, 32, device=DEV) * 6
    cos, sin = torch.cat([freqs.cos()] * 2, -1).bfloat16(), torch.cat([freqs.sin()] * 2, -1).bfloat16()
    assert layer._fused_qk_rope(torch.empty(1, 1, 4, 64, device=DEV, dtype=torch.bfloat16), cos)
    dy = torch.randn(2, 33, 256, device=DEV, dtype=torch.bfloat16)
    runs = []
    for fuse in (True, False):
        attn_mod.FUSE_QK_NORM_ROPE = fuse
        try:
            y = layer(x, cos, sin, Masks(None, 33, x.device))
            runs.append((y, *torch.autograd.grad(y, (x, *layer.parameters()), dy)))
        finally:
            attn_mod.FUSE_QK_NORM_ROPE = True
    for got, want in zip(*runs):
        assert torch.equal(got, want)
