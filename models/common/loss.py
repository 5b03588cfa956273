"""Causal-LM cross-entropy without materialising the full fp32 logits.

Contract: `causal_lm_loss(hidden [B, S, H], weight [V, H], labels [B, S], impl, chunk_tokens, ignore_index,
num_items_in_batch, shift_labels) -> scalar fp32` equals transformers' `ForCausalLMLoss(hidden @ weight.T, labels)`
(labels shifted left by one, `ignore_index` rows skipped, mean over counted rows or sum / `num_items_in_batch`).

"chunked" / "triton": `LinearCrossEntropy` walks the rows in chunks of `chunk_tokens`: logits of one chunk (in the
hidden dtype, as transformers' lm_head computes them), their fp32 loss, and, when a gradient is needed, the
gradient of the logits (softmax - one-hot, scaled, stored in the hidden dtype like transformers' backward) turned at
once into this chunk's input gradient and its share of the weight gradient. Backward only scales the stored
gradients by the incoming one: no recomputation, and at most one chunk of logits is alive. The "triton" variant
computes loss and logit gradient in one fused in-place pass over each chunk (models/common/kernels.py).
"full": transformers' computation (full fp32 logits).

`LMHead` is the output head (`nn.Linear`, parameter `weight`, so state dicts are unchanged) with a `loss(hidden,
labels, ...)` method running `causal_lm_loss` on its own weight. The loss reads the weight inside a method of the
module that owns it, so FSDP2 can make the head a unit of its own (`parallel.expert_parallel` registers `loss` as a
forward method): the head is gathered when the loss starts and its gradient is reduced as soon as the loss's
backward has run, overlapping the decoder's backward instead of ending it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import triton_ok

_CHUNK_BUDGET_BYTES = {"chunked": 1 << 30, "triton": 2 << 30}


def shifted_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels [B, S] -> targets [B, S]: position t predicts labels[t + 1]; the last position is ignored."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def auto_chunk_tokens(vocab: int, impl: str) -> int:
    per_row = vocab * (2 if impl == "triton" else 12)  # triton: the logits chunk only; torch: fp32 temporaries
    chunk = max(1, _CHUNK_BUDGET_BYTES.get(impl, 1 << 30) // per_row)
    return 1 << (chunk.bit_length() - 1)  # power of two


def _chunk_loss_and_grad_torch(
    logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row fp32 loss (0 on ignored rows) and, if grad_scale is given, d(loss_sum * grad_scale)/d logits."""
    lf = logits.float()
    valid = targets != ignore_index
    tgt = targets.clamp(min=0)
    lse = torch.logsumexp(lf, dim=-1)
    loss = (lse - lf.gather(1, tgt[:, None]).squeeze(1)) * valid
    if grad_scale is None:
        return loss, None
    grad = torch.exp(lf.sub_(lse[:, None]))
    grad.scatter_add_(1, tgt[:, None], -torch.ones_like(lse)[:, None])
    grad.mul_((valid.float() * grad_scale)[:, None])
    return loss, grad.to(logits.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN205, PLR0913
        ctx,  # noqa: ANN001
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        denom: torch.Tensor,
        chunk_tokens: int,
        impl: str,
        ignore_index: int,
    ):
        n = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        inv_denom = (1.0 / denom.float()).reshape(())
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad and ctx.needs_input_grad[0] else None
        grad_w = None
        multi = n > chunk_tokens
        for start in range(0, n, chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            t = targets[start : start + chunk_tokens]
            logits = h @ weight.t()
            if impl == "triton":
                from .kernels import cross_entropy_fwd_bwd

                loss, g = cross_entropy_fwd_bwd(logits, t, inv_denom if need_grad else None, ignore_index)
            else:
                loss, g = _chunk_loss_and_grad_torch(logits, t, inv_denom if need_grad else None, ignore_index)
            loss_sum = loss_sum + loss.sum()
            del logits
            if g is None:
                continue
            if grad_h is not None:
                torch.mm(g, weight.to(g.dtype), out=grad_h[start : start + chunk_tokens])
            if ctx.needs_input_grad[1]:
                gw = g.t() @ h
                if grad_w is None:
                    grad_w = gw.float() if multi and gw.dtype in (torch.bfloat16, torch.float16) else gw
                else:
                    grad_w.add_(gw)
            del g
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss_sum * inv_denom

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        if getattr(ctx, "used", False):
            raise RuntimeError("the chunked cross-entropy cannot be back-propagated twice (retain_graph)")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        # in place: these buffers exist only for this backward (saves a copy of the [V, H] weight gradient);
        # _foreach_mul_ keeps the scale on the device and runs vectorised (a plain mul_ by a 0-dim CUDA tensor does not)
        grads = [g for g in (grad_h, grad_w) if g is not None]
        if grads:
            torch._foreach_mul_(grads, grad_out.to(grads[0].dtype))
        return grad_h, grad_w, None, None, None, None, None


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    impl: str = "chunked",
    chunk_tokens: int = 0,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    targets = shift_labels if shift_labels is not None else shifted_targets(labels, ignore_index)
    targets = targets.reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    if impl == "full":
        logits = (h @ weight.t()).float()
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
        return loss / num_items_in_batch if num_items_in_batch is not None else loss
    if num_items_in_batch is None:
        denom = (targets != ignore_index).sum()
    else:
        denom = torch.as_tensor(num_items_in_batch, device=h.device)
    impl = "triton" if triton_ok(h, impl) else ("chunked" if impl in ("auto", "triton") else impl)
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0], impl)
    return LinearCrossEntropy.apply(h, weight, targets, denom, chunk, impl, ignore_index)


class LMHead(nn.Linear):
    """The output head: `forward(hidden) -> logits` as `nn.Linear`; `loss(hidden, labels, ...)` is
    `causal_lm_loss(hidden, self.weight, labels, ...)` (see the module docstring)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:  # noqa: ANN003
        return causal_lm_loss(hidden, self.weight, labels, **kwargs)
