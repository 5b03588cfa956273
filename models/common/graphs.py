"""CUDA graphs for the zoo's decoder layers (experimental; benchmarks with fixed shapes).

Contract: `graph_decoder_layers(model, batch, seq)` captures every decoder layer's forward and backward with
`torch.cuda.make_graphed_callables` for inputs of exactly `[batch, seq, H]` (causal mask, no padding mask) and
swaps each layer for a wrapper that replays them; a call with other shapes, a padding mask or no grad runs the
original layer. The layers must not sync with the host (the zoo's grouped_mm path does not). Parameters are read
in place, so optimizer steps are seen by later replays; gradients accumulate into `.grad` as usual. Peak memory
grows by the graphs' static buffers. Returns the number of layers graphed.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Masks


class _Static(nn.Module):
    """`layer(x, cos, sin)` with a fixed causal mask; returns only tensors (as graph capture needs)."""

    def __init__(self, layer: nn.Module, masks: Masks, with_logits: bool) -> None:
        super().__init__()
        self.layer, self.masks, self.with_logits = layer, masks, with_logits

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):  # noqa: ANN201
        y, logits = self.layer(x, cos, sin, self.masks)
        return (y, logits) if self.with_logits else y


class GraphedLayer(nn.Module):
    def __init__(self, layer: nn.Module, graphed, shape: tuple[int, ...], with_logits: bool) -> None:  # noqa: ANN001
        super().__init__()
        self.layer = layer
        self._graphed = graphed
        self._shape, self._with_logits = shape, with_logits

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: Masks):  # noqa: ANN201
        if tuple(x.shape) != self._shape or masks.padding is not None or not torch.is_grad_enabled():
            return self.layer(x, cos, sin, masks)
        out = self._graphed(x, cos, sin)
        return out if self._with_logits else (out, None)


def graph_decoder_layers(model: nn.Module, batch: int, seq: int) -> int:
    layers = model.model.layers
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    hidden = model.config.hidden_size
    masks = Masks(None, seq, device)
    x0 = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    pos = torch.arange(seq, device=device)[None].expand(batch, seq)
    cos, sin = model.model.rotary_emb(x0, pos)
    statics, samples, flags = [], [], []
    for layer in layers:
        with torch.no_grad():
            _, logits = layer(x0, cos, sin, masks)
        flags.append(logits is not None)
        statics.append(_Static(layer, masks, flags[-1]))
        samples.append((x0.clone().requires_grad_(True), cos, sin))
    graphed = torch.cuda.make_graphed_callables(tuple(statics), tuple(samples), num_warmup_iters=3)
    for i, (layer, g, f) in enumerate(zip(list(layers), graphed, flags)):
        layers[i] = GraphedLayer(layer, g, (batch, seq, hidden), f)
    for p in model.parameters():  # warm-up ran backward through the samples; start from clean gradients
        p.grad = None
    return len(statics)
