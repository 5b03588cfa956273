"""Triton kernels for the CUDA hot path, each with a plain-torch reference it is tested against (gpu tests).

Imported lazily, only when a layer runs on CUDA with Triton installed (backend "triton" or "auto").
- `rms_norm(x [..., N], weight [N], eps)`: fp32 statistics, `weight * (x * rstd).to(dtype)` (transformers'
  rounding); backward recomputes nothing but x and rstd; the weight gradient is reduced from per-program partials.
- `swiglu_weighted(h [S, 2I], row_weight [S] | None) -> [S, I]`: `silu(gate) * up * w` with gate = h[:, :I],
  up = h[:, I:], fp32 inside, one rounding; backward writes d(gate|up) straight into one [S, 2I] buffer (what the
  grouped GEMM backward wants) and reduces d(row_weight) per row.
- `gather_sum(src [S, H], idx [T*K], K) -> [T, H]`: `out[t] = sum_k src[idx[t*K + k]]` in fp32, one rounding: the
  MoE combine (y back to token order, summed over the K slots) and the backward of the dispatch gather, in one pass
  without the [T*K, H] intermediate torch's index_select + sum writes. An index equal to S (one past the last row)
  reads a row of zeros: the empty slots of expert parallelism's gathers, without appending a zero row to `src`.
- `rope_half(x [B, S, H, D] any strides, cos [B, S, R], sin [B, S, R]) -> [B, S, H, D]` contiguous: rotary
  embedding in the "half" convention (`x1 * cos - x2 * sin`, `x2 * cos + x1 * sin` on the first R dims, the rest
  passed through), fp32 inside, one rounding; backward applies the inverse rotation. Replaces torch's rotate_half /
  cat / broadcast multiplies on transposed views (about ten memory passes) with one read and one write.
- `qk_norm_rope(q [B, S, Hq, D], k [B, S, Hk, D], wq [D], wk [D], eps, cos, sin) -> (q', k')`: Qwen3-style per-head
  RMSNorm of q and k followed by `rope_half`, both tensors in ONE launch forward and one backward (instead of four
  each, plus their allocations and weight-gradient reductions). Bit-identical to `rope_half(rms_norm(q, wq, eps), cos,
  sin)` and the same for k, values and every gradient: each row runs the two kernels' arithmetic in their order,
  with the normalised row rounded to the dtype in between (through the output buffer), and the weight gradients
  are reduced over the same row partition as `rms_norm`'s backward.
- `cross_entropy_fwd_bwd(logits [C, V], targets [C], grad_scale | None, ignore_index) -> (loss [C] fp32, grad)`:
  per row an online max / sum-exp pass then, if `grad_scale` (0-dim tensor) is given, a second pass that overwrites
  the logits IN PLACE with `(softmax - onehot) * grad_scale` (0 on ignored rows) in the logits dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    xhat = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * xhat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd(DY, X, W, RSTD, DX, DW, rows, N, rows_per_prog, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, rows)
    for row in range(start, end):
        off = tl.cast(row, tl.int64) * N
        x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.store(DX + off + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor, b: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.expand(b, s, -1), sin.expand(b, s, -1)
    if cos.stride(2) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _row_partition(rows: int, device: torch.device) -> tuple[int, int]:
    """`rms_norm` backward's programs and rows per program (the weight gradient's summation order)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4
    progs = max(1, min(rows, sms * 8))
    return progs, triton.cdiv(rows, progs) if rows else 1


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        if x2.shape[0]:
            _rms_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[-1]
        rows = x2.shape[0]
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        progs, per = _row_partition(rows, x2.device)
        # every program writes its whole row of partial sums: nothing to clear unless no program runs
        dw_part = (torch.empty if rows else torch.zeros)(progs, n, dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(n)
        if rows:
            _rms_bwd[(progs,)](dy2, x2, weight, rstd, dx, dw_part, rows, n, per, BLOCK=block, num_warps=_warps(block))
        return dx.view(ctx.shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


# ---------------------------------------------------------------- SwiGLU with the routing weight folded in


@triton.jit
def _swiglu_fwd(H, S, OUT, inter, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(H + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(H + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    if HAS_S:
        out = out * tl.load(S + row).to(tl.float32)
    tl.store(OUT + row * inter + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DOUT, H, S, DH, DS, inter, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_S:
        s = tl.load(S + row).to(tl.float32)
    else:
        s = 1.0
    ds = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, inter, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(H + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(H + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dsilu = sig * (1.0 + g * (1.0 - sig))
        tl.store(DH + row * 2 * inter + cols, (dout * u * s * dsilu).to(DH.dtype.element_ty), mask=mask)
        tl.store(DH + row * 2 * inter + inter + cols, (dout * silu * s).to(DH.dtype.element_ty), mask=mask)
        ds += dout * silu * u
    if HAS_S:
        tl.store(DS + row, tl.sum(ds, axis=0))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        h = h.contiguous()
        rows, inter = h.shape[0], h.shape[1] // 2
        out = torch.empty(rows, inter, dtype=h.dtype, device=h.device)
        block = min(triton.next_power_of_2(inter), 1024)
        if rows:
            _swiglu_fwd[(rows, triton.cdiv(inter, block))](h, s if s is not None else h, out, inter, HAS_S=s is not None, BLOCK=block, num_warps=4)
        ctx.save_for_backward(h, s)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # noqa: ANN001, ANN205
        h, s = ctx.saved_tensors
        rows, inter = h.shape[0], h.shape[1] // 2
        dh = torch.empty_like(h)
        ds = torch.empty(rows, dtype=torch.float32, device=h.device) if s is not None else None
        block = min(triton.next_power_of_2(inter), 1024)
        if rows:
            _swiglu_bwd[(rows,)](dout.contiguous(), h, s if s is not None else h, dh, ds if ds is not None else dh, inter, HAS_S=s is not None, BLOCK=block, num_warps=4)
        return dh, (ds.to(s.dtype) if s is not None else None)


def swiglu_weighted(h: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
    return _SwiGLU.apply(h, None if row_weight is None else row_weight.contiguous())


# ---------------------------------------------------------------- cross-entropy on a chunk of logits


@triton.jit
def _ce_kernel(X, T, LOSS, SCALE, stride, V, ignore_index, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = X + row * stride
    t = tl.load(T + row)
    m = -float("inf")
    acc = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(acc)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)
    x_t = tl.load(base + t_safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    if HAS_GRAD:
        scale = tl.where(valid, tl.load(SCALE).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == t_safe, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(X.dtype.element_ty), mask=mask)


def cross_entropy_fwd_bwd(
    logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor | None, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = logits.contiguous()
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    scale = grad_scale.reshape(1).float() if grad_scale is not None else loss
    if rows:
        _ce_kernel[(rows,)](
            logits, targets.contiguous(), loss, scale, logits.stride(0), vocab, ignore_index,
            HAS_GRAD=grad_scale is not None, BLOCK=4096, num_warps=8,
        )
    return loss, (logits if grad_scale is not None else None)


# ---------------------------------------------------------------- MoE permutation: gather K rows and sum them


@triton.jit
def _gather_sum_kernel(SRC, IDX, OUT, H, ROWS, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(IDX + t * K + k).to(tl.int64)
        acc += tl.load(SRC + r * H + cols, mask=mask & (r < ROWS), other=0.0).to(tl.float32)  # r == ROWS: a zero row
    tl.store(OUT + t * H + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def gather_sum(src: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    src = src.contiguous()
    h = src.shape[1]
    t = idx.numel() // k
    out = torch.empty(t, h, dtype=src.dtype, device=src.device)
    block = min(triton.next_power_of_2(h), 2048)
    if t:
        _gather_sum_kernel[(t, triton.cdiv(h, block))](src, idx.contiguous(), out, h, src.shape[0], K=k, BLOCK=block, num_warps=_warps(block))
    return out


# ---------------------------------------------------------------- rotary embedding ("half" convention, partial)


@triton.jit
def _rope_kernel(X, COS, SIN, Y, S, H, sxb, sxs, sxh, scb, scs, D: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
    # one program per (b, s) token, all heads at once
    tok = tl.program_id(0).to(tl.int64)
    b = tok // S
    s = tok % S
    heads = tl.arange(0, BLOCK_H)[:, None]
    hm = heads < H
    p = tl.arange(0, BLOCK_P)[None, :]
    pm = p < HALF
    c = tl.load(COS + b * scb + s * scs + p, mask=pm, other=0.0).to(tl.float32)
    sn = tl.load(SIN + b * scb + s * scs + p, mask=pm, other=0.0).to(tl.float32)
    if INVERSE:
        sn = -sn
    xbase = X + b * sxb + s * sxs + heads * sxh
    ybase = Y + tok * H * D + heads * D
    x1 = tl.load(xbase + p, mask=hm & pm, other=0.0).to(tl.float32)
    x2 = tl.load(xbase + HALF + p, mask=hm & pm, other=0.0).to(tl.float32)
    tl.store(ybase + p, (x1 * c - x2 * sn).to(Y.dtype.element_ty), mask=hm & pm)
    tl.store(ybase + HALF + p, (x2 * c + x1 * sn).to(Y.dtype.element_ty), mask=hm & pm)
    if 2 * HALF < D:  # partial rotary: copy the rest
        d = 2 * HALF + tl.arange(0, BLOCK_D)[None, :]
        dm = d < D
        tl.store(ybase + d, tl.load(xbase + d, mask=hm & dm, other=0.0), mask=hm & dm)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    b, s, h, d = x.shape
    half = cos.shape[-1] // 2
    if x.stride(3) != 1:
        x = x.contiguous()
    cos, sin = _rope_tables(cos, sin, b, s)
    y = torch.empty(b, s, h, d, dtype=x.dtype, device=x.device)
    if x.numel():
        rest = d - 2 * half
        _rope_kernel[(b * s,)](
            x, cos, sin, y, s, h, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
            D=d, HALF=half, BLOCK_H=triton.next_power_of_2(h), BLOCK_P=triton.next_power_of_2(half),
            BLOCK_D=triton.next_power_of_2(max(rest, 1)), INVERSE=inverse, num_warps=4,
        )
    return y


class _RopeHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, inverse=True), None, None


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _RopeHalf.apply(x, cos, sin)


# ---------------------------------------------------------------- per-head q/k RMSNorm + rope, fused


@triton.jit
def _norm_rope_row(X, W, Y, RSTD, row, COS, SIN, S, H, scb, scs, N, eps,
                   HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    # _rms_fwd's arithmetic on one row, written to Y, then _rope_kernel's on the rounded row, in place
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    xhat = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (w * xhat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)
    tl.debug_barrier()
    tok = row // H
    b = tok // S
    s = tok % S
    p = tl.arange(0, BLOCK_P)
    pm = p < HALF
    c = tl.load(COS + b * scb + s * scs + p, mask=pm, other=0.0).to(tl.float32)
    sn = tl.load(SIN + b * scb + s * scs + p, mask=pm, other=0.0).to(tl.float32)
    x1 = tl.load(Y + row * N + p, mask=pm, other=0.0).to(tl.float32)
    x2 = tl.load(Y + row * N + HALF + p, mask=pm, other=0.0).to(tl.float32)
    tl.debug_barrier()
    tl.store(Y + row * N + p, (x1 * c - x2 * sn).to(Y.dtype.element_ty), mask=pm)
    tl.store(Y + row * N + HALF + p, (x2 * c + x1 * sn).to(Y.dtype.element_ty), mask=pm)


@triton.jit
def _qk_norm_rope_fwd(Q, K, WQ, WK, QO, KO, RQ, RK, COS, SIN, S, HQ, HK, scb, scs, rows_q, N, eps,
                      HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if row < rows_q:
        _norm_rope_row(Q, WQ, QO, RQ, row, COS, SIN, S, HQ, scb, scs, N, eps, HALF, BLOCK, BLOCK_P)
    else:
        _norm_rope_row(K, WK, KO, RK, row - rows_q, COS, SIN, S, HK, scb, scs, N, eps, HALF, BLOCK, BLOCK_P)


@triton.jit
def _rope_norm_bwd_rows(DY, X, W, RSTD, DX, DW, pid, rows, per, H, sdb, sds, sdh, COS, SIN, S, scb, scs, N,
                        HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    # per row: _rope_kernel's inverse rotation of dy, rounded into DX; then _rms_bwd's arithmetic on it
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    p = tl.arange(0, BLOCK_P)
    pm = p < HALF
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * per
    end = tl.minimum(start + per, rows)
    for row in range(start, end):
        r = tl.cast(row, tl.int64)
        tok = r // H
        b = tok // S
        s = tok % S
        dbase = DY + b * sdb + s * sds + (r % H) * sdh
        off = r * N
        c = tl.load(COS + b * scb + s * scs + p, mask=pm, other=0.0).to(tl.float32)
        sn = -tl.load(SIN + b * scb + s * scs + p, mask=pm, other=0.0).to(tl.float32)
        d1 = tl.load(dbase + p, mask=pm, other=0.0).to(tl.float32)
        d2 = tl.load(dbase + HALF + p, mask=pm, other=0.0).to(tl.float32)
        tl.store(DX + off + p, (d1 * c - d2 * sn).to(DX.dtype.element_ty), mask=pm)
        tl.store(DX + off + HALF + p, (d2 * c + d1 * sn).to(DX.dtype.element_ty), mask=pm)
        if 2 * HALF < BLOCK:  # partial rotary: the rest passes through
            d = 2 * HALF + tl.arange(0, BLOCK_R)
            dm = d < N
            tl.store(DX + off + d, tl.load(dbase + d, mask=dm, other=0.0), mask=dm)
        tl.debug_barrier()
        x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DX + off + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.debug_barrier()
        tl.store(DX + off + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=mask)


@triton.jit
def _qk_norm_rope_bwd(DQO, DKO, Q, K, WQ, WK, RQ, RK, DQ, DK, DWQ, DWK, COS, SIN, S, HQ, HK,
                      sqb, sqs, sqh, skb, sks, skh, scb, scs, rows_q, rows_k, per_q, per_k, progs_q, N,
                      HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    if pid < progs_q:
        _rope_norm_bwd_rows(DQO, Q, WQ, RQ, DQ, DWQ, pid, rows_q, per_q, HQ, sqb, sqs, sqh, COS, SIN, S, scb, scs, N,
                            HALF, BLOCK, BLOCK_P, BLOCK_R)
    else:
        _rope_norm_bwd_rows(DKO, K, WK, RK, DK, DWK, pid - progs_q, rows_k, per_k, HK, skb, sks, skh, COS, SIN, S,
                            scb, scs, N, HALF, BLOCK, BLOCK_P, BLOCK_R)


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, wq, wk, eps, cos, sin):  # noqa: ANN001, ANN205, PLR0913
        b, s, hq, n = q.shape
        hk = k.shape[2]
        q2, k2 = q.reshape(-1, n).contiguous(), k.reshape(-1, n).contiguous()
        cos, sin = _rope_tables(cos, sin, b, s)
        qo, ko = torch.empty_like(q2), torch.empty_like(k2)
        rq = torch.empty(q2.shape[0], dtype=torch.float32, device=q.device)
        rk = torch.empty(k2.shape[0], dtype=torch.float32, device=q.device)
        half, block = cos.shape[-1] // 2, triton.next_power_of_2(n)
        _qk_norm_rope_fwd[(q2.shape[0] + k2.shape[0],)](
            q2, k2, wq, wk, qo, ko, rq, rk, cos, sin, s, hq, hk, cos.stride(0), cos.stride(1), q2.shape[0], n, eps,
            HALF=half, BLOCK=block, BLOCK_P=triton.next_power_of_2(half), num_warps=_warps(block),
        )
        ctx.save_for_backward(q2, k2, wq, wk, rq, rk, cos, sin)
        ctx.shapes = (q.shape, k.shape)
        return qo.view(q.shape), ko.view(k.shape)

    @staticmethod
    def backward(ctx, dqo: torch.Tensor, dko: torch.Tensor):  # noqa: ANN001, ANN205
        q2, k2, wq, wk, rq, rk, cos, sin = ctx.saved_tensors
        (_, s, hq, n), hk = ctx.shapes[0], ctx.shapes[1][2]
        dqo = dqo if dqo.stride(3) == 1 else dqo.contiguous()
        dko = dko if dko.stride(3) == 1 else dko.contiguous()
        dq, dk = torch.empty_like(q2), torch.empty_like(k2)
        (pq, per_q), (pk, per_k) = _row_partition(q2.shape[0], q2.device), _row_partition(k2.shape[0], q2.device)
        part = torch.empty(pq + pk, n, dtype=torch.float32, device=q2.device)  # every program writes its row
        half, block = cos.shape[-1] // 2, triton.next_power_of_2(n)
        _qk_norm_rope_bwd[(pq + pk,)](
            dqo, dko, q2, k2, wq, wk, rq, rk, dq, dk, part[:pq], part[pq:], cos, sin, s, hq, hk,
            dqo.stride(0), dqo.stride(1), dqo.stride(2), dko.stride(0), dko.stride(1), dko.stride(2),
            cos.stride(0), cos.stride(1), q2.shape[0], k2.shape[0], per_q, per_k, pq, n,
            HALF=half, BLOCK=block, BLOCK_P=triton.next_power_of_2(half),
            BLOCK_R=triton.next_power_of_2(max(n - 2 * half, 1)), num_warps=_warps(block),
        )
        dwq, dwk = part[:pq].sum(0).to(wq.dtype), part[pq:].sum(0).to(wk.dtype)
        return dq.view(ctx.shapes[0]), dk.view(ctx.shapes[1]), dwq, dwk, None, None, None


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of q [B, S, Hq, D] and k [B, S, Hk, D] (any row count > 0), see the module docstring."""
    return _QKNormRope.apply(q, k, wq, wk, eps, cos, sin)
