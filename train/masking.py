"""Attention kept inside each packed document, without touching the model code.

Contract: `DocumentMasking(model, kernel)` puts a forward pre-hook on every decoder layer that swaps the layer's
`Masks` argument for a `DocMasks` (`models.common.attention.DocumentMasks`) while `with masking.documents(doc_ids):`
is active (doc_ids `[B, S]`, one id per packed document, a run of equal ids per document). No token attends across
a document boundary. Which kernel does it is decided per layer call by `attention()` and recorded:
- "varlen": `torch.nn.attention.varlen.varlen_attn` (flash, causal per document, rows concatenated, `cu_seqlens`
  from the ids) with `attn` auto/sdpa/flash on CUDA in bf16/fp16, for layers without sliding window, sinks or
  dropout (`attention.varlen_blocker` says why not);
- otherwise "sdpa-mask" / "eager-mask": the explicit block-causal `[B, 1, S, S]` mask (sdpa leaves its flash kernel);
  `attn` flash and te refuse such a layer (one-line NotImplementedError) rather than attend across documents.
`kernel` "auto" (the above), "varlen" (refuse where varlen cannot run), "mask" (always the explicit mask).
`plan(model, device_type, dtype, kernel)` predicts the same per layer before the weights load (the trainer refuses
an impossible one there). `last_kernels` / `last_why` hold what the latest `documents` forward ran (per kernel: how
many layer calls) and why varlen did not; `describe()` says it in one line. A model whose decoder layers take no
`Masks` (transformers' own classes) is refused at its first document forward, never run with cross-document
attention.
CUDA-graphed layers (`--cuda-graphs`) fall back to the eager layer for such a call (the trainer refuses the
combination). Outside the context (synthetic data, `--packing-mask causal`) the layers see the model's own masks,
except that activation checkpointing's recomputation of a forward made inside it gets that forward's masks again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.common.attention import DocumentMasks, Masks

DocMasks = DocumentMasks  # the older name

KERNEL_WORDS = {"varlen": "varlen_attn (flash, per-document cu_seqlens)", "sdpa-mask": "sdpa with an explicit block-causal mask",
                "eager-mask": "eager attention with an explicit block-causal mask"}


def plan(model: nn.Module, device_type: str, dtype: torch.dtype, kernel: str = "auto") -> tuple[dict[str, int], list[str]]:
    """What `attention()` will run for document masks in each attention layer of `model` (a meta model will do),
    training, on `device_type` in `dtype`: ({kernel: layers}, reasons varlen will not run). NotImplementedError (one
    line) for a layer that cannot keep documents apart, before any weight is read."""
    from ..models.common.attention import GQAttention, document_kernel
    from ..models.common.mla import MLAttention

    counts: dict[str, int] = {}
    why: list[str] = []
    for mod in model.modules():
        if isinstance(mod, GQAttention):
            dims, window, sinks = (mod.head_dim, mod.head_dim), mod.sliding_window, mod.sinks is not None
        elif isinstance(mod, MLAttention):
            dims, window, sinks = (mod.qk_dim, mod.v_dim), None, False
        else:
            continue
        name, reason = document_kernel(kernel, mod.impl, device_type, dtype, *dims, sliding_window=window, sinks=sinks, dropout=mod.dropout)
        counts[name] = counts.get(name, 0) + 1
        if reason and reason not in why:
            why.append(reason)
    if not counts:
        raise NotImplementedError(f"{type(model).__name__} has none of the zoo's attention layers (transformers' own class), "
                                  "so packed documents cannot be kept apart: use --packing-mask causal")
    return counts, why


class DocumentMasking:
    def __init__(self, model: nn.Module, kernel: str = "auto") -> None:
        from ..parallel.expert_parallel import decoder_layers

        self.kernel = kernel
        self._masks: DocMasks | None = None
        self._seen: dict[int, tuple[Masks, DocMasks]] = {}
        self.last_kernels: dict[str, int] = {}
        self.last_why: list[str] = []
        self._hooks = [layer.register_forward_pre_hook(self._swap) for layer in decoder_layers(model)]

    def _swap(self, module: nn.Module, args: tuple) -> tuple | None:
        out, swapped = [], False
        for a in args:
            if isinstance(a, Masks) and not isinstance(a, DocMasks):
                if self._masks is not None:
                    self._seen[id(a)] = (a, self._masks)
                    a, swapped = self._masks, True
                elif id(a) in self._seen and self._seen[id(a)][0] is a:  # recomputed in backward (--ac)
                    a = self._seen[id(a)][1]
            swapped = swapped or isinstance(a, DocMasks)
            out.append(a)
        if self._masks is not None and not swapped:  # transformers' own layers would attend across documents
            raise NotImplementedError(f"{type(module).__name__} takes no zoo attention masks, so packed documents cannot be "
                                      "kept apart: use --packing-mask causal")
        return tuple(out)

    @contextmanager
    def documents(self, doc_ids: torch.Tensor | None) -> Iterator[None]:
        """Per-document attention for the forwards inside; activation checkpointing's recomputation in the following
        backward gets the same masks (looked up by the model's own `Masks` object), until the next `documents`."""
        self._seen = {}
        self._masks = None if doc_ids is None else DocMasks(doc_ids, doc_ids.device, self.kernel)
        if self._masks is not None and doc_ids.is_cuda and self.kernel != "mask":
            self._masks.cu_seqlens()  # before the layers (one host sync), so compiled attention reads tensors only
        masks = self._masks
        try:
            yield
        finally:
            self._masks = None
            if masks is not None and masks.kernels:
                self.last_kernels, self.last_why = dict(masks.kernels), list(masks.why)

    def describe(self) -> str:
        """What the latest document forward ran, e.g. "varlen_attn (...) in 8 of 8 attention calls"."""
        if not self.last_kernels:
            return "no document forward yet"
        total = sum(self.last_kernels.values())
        parts = [f"{KERNEL_WORDS.get(k, k)} in {n} of {total} attention calls" for k, n in self.last_kernels.items()]
        why = f" (no varlen: {'; '.join(self.last_why)})" if self.last_why else ""
        return ", ".join(parts) + why

    def short(self) -> str:
        """`last_kernels` as "varlen" or "varlen:6,sdpa-mask:2" (metrics rows)."""
        if len(self.last_kernels) == 1:
            return next(iter(self.last_kernels))
        return ",".join(f"{k}:{n}" for k, n in self.last_kernels.items())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
