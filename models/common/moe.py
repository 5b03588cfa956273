"""Feed-forward blocks: the dense SwiGLU MLP and the MoE block (router + grouped experts + optional shared experts).

Contract:
- `DenseMLP(hidden, intermediate)`: `gate_proj, up_proj, down_proj` (HF names), `down(act(gate(x)) * up(x))`.
- `MoEBlock(router, experts, router_name="gate", shared=None, shared_name="shared_experts", shared_gate=False)`:
  `forward(x [B, S, H]) -> (y [B, S, H], router_logits [B*S, E])`. Routed output plus, if present, the shared
  expert(s) (`shared_experts` for DeepSeek/GLM/dots1, `shared_expert` + sigmoid `shared_expert_gate [1, H]` for
  qwen2_moe). `jitter_noise` (Mixtral) multiplies the input by U(1-j, 1+j) in training mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import make_linear


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", linear_impl: str = "torch") -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = make_linear(hidden_size, intermediate_size, False, linear_impl)
        self.up_proj = make_linear(hidden_size, intermediate_size, False, linear_impl)
        self.down_proj = make_linear(intermediate_size, hidden_size, False, linear_impl)
        self.act_fn = F.silu if act == "silu" else ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        *,
        router_name: str = "gate",
        shared: nn.Module | None = None,
        shared_name: str = "shared_experts",
        shared_gate: bool = False,
        hidden_size: int | None = None,
        jitter_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.router_name, self.shared_name = router_name, shared_name
        self.add_module(router_name, router)
        self.experts = experts
        if shared is not None:
            self.add_module(shared_name, shared)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_gate else None
        self.jitter_noise = jitter_noise

    def get_router(self) -> nn.Module:
        return self._modules[self.router_name]

    def get_shared(self) -> nn.Module | None:
        return self._modules.get(self.shared_name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        flat = x.reshape(-1, shape[-1])
        routing = self.get_router()(flat)
        out = self.experts(flat, routing.indices, routing.weights)
        shared = self.get_shared()
        if shared is not None:
            s = shared(flat)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(flat)) * s
            out = out + s
        return out.view(shape), routing.logits
