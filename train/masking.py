"""Block-causal attention for packed documents, without touching the model code.

Contract: `DocumentMasking(model)` puts a forward pre-hook on every decoder layer that swaps the layer's `Masks`
argument for a `DocMasks` while `with masking.documents(doc_ids):` is active (doc_ids `[B, S]`, one id per packed
document). `DocMasks`' mask is causal AND same-document (AND the layer's sliding window), so no token attends
across a document boundary. Backends:
- "sdpa" (the default on CPU and whenever a mask is needed) and "eager" take the explicit block-causal mask;
- "flash" and "te" run plain causal attention only: they refuse (a one-line NotImplementedError from the model),
  so use `--backend attn=sdpa` or `--packing-mask causal` with them;
- CUDA-graphed layers (`--cuda-graphs`) fall back to the eager layer for such a call (the trainer refuses the combination).
Outside the context (synthetic data, `--packing-mask causal`) the layers see the model's own masks, except that
activation checkpointing's recomputation of a forward made inside it gets that forward's masks again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.common.attention import Masks


class DocMasks(Masks):
    """Causal + same-document (+ sliding window) masks; `padding` is an all-true tensor so kernels that cannot take
    a mask (flash, te) refuse instead of silently attending across documents."""

    def __init__(self, doc_ids: torch.Tensor, device: torch.device) -> None:
        super().__init__(torch.ones_like(doc_ids, dtype=torch.bool), doc_ids.shape[1], device)
        self.doc_ids = doc_ids.to(device)

    def _build(self, window: int | None, kv_len: int) -> torch.Tensor:
        """The model's causal (+ window) mask AND same-document: `[B, 1, S, kv_len]` bool."""
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, -kv_len:]
        return super()._build(window, kv_len) & same[:, None]


class DocumentMasking:
    def __init__(self, model: nn.Module) -> None:
        from ..parallel.expert_parallel import decoder_layers

        self._masks: DocMasks | None = None
        self._seen: dict[int, tuple[Masks, DocMasks]] = {}
        self._hooks = [layer.register_forward_pre_hook(self._swap) for layer in decoder_layers(model)]

    def _swap(self, module: nn.Module, args: tuple) -> tuple | None:
        out = []
        for a in args:
            if isinstance(a, Masks) and not isinstance(a, DocMasks):
                if self._masks is not None:
                    self._seen[id(a)] = (a, self._masks)
                    a = self._masks
                elif id(a) in self._seen and self._seen[id(a)][0] is a:  # recomputed in backward (--ac)
                    a = self._seen[id(a)][1]
            out.append(a)
        return tuple(out)

    @contextmanager
    def documents(self, doc_ids: torch.Tensor | None) -> Iterator[None]:
        """Block-causal masks for the forwards inside; activation checkpointing's recomputation in the following
        backward gets the same masks (looked up by the model's own `Masks` object), until the next `documents`."""
        self._seen: dict[int, tuple[Masks, DocMasks]] = {}
        self._masks = None if doc_ids is None else DocMasks(doc_ids, doc_ids.device)
        try:
            yield
        finally:
            self._masks = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
