"""Routers (gates) of the MoE block, the load-balancing auxiliary loss and the auxiliary-loss-free bias update.

Contract: a router maps `x [T, H]` to `Routing(logits [T, E], weights [T, K], indices [T, K] int64)`; `logits` are
what transformers records as `router_logits` (input of the auxiliary loss).
- `SoftmaxTopKRouter` (`weight [E, H]`, optional `bias [E]`):
  scoring "softmax": softmax(fp32) -> top-k -> optional renormalisation (`norm_topk_prob`), weights cast back to the
  logits dtype unless `keep_fp32_weights` (Mixtral keeps fp32); qwen3_moe, qwen2_moe, olmoe, mixtral.
  scoring "topk_softmax": top-k of the logits, softmax over the k values (GPT-OSS, with `bias`).
- `SigmoidGroupRouter` (`weight [E, H]` fp32, buffer `e_score_correction_bias [E]` fp32): sigmoid scores; experts are
  chosen on `scores + e_score_correction_bias` restricted to the `topk_group` best of `n_group` groups (a group's
  score is the sum of its two best experts); weights are the unbiased scores of the chosen experts, optionally
  renormalised (+1e-20), times `routed_scaling_factor` (deepseek_v3, glm4_moe, dots1).
- `balanced` (both routers, benchmarking only): token t's slot j goes to expert (t*K + j) mod E, i.e. round-robin,
  every expert gets T*K/E rows (K <= E). The router still runs and the weights are its (renormalised) probabilities
  at those experts, so the compute and the gradient paths are those of a real step with a perfectly even load.
- `load_balancing_loss(router_logits, num_experts, top_k, attention_mask)` equals transformers'
  `load_balancing_loss_func` (Switch Transformer loss over all layers' logits).
- `SigmoidGroupRouter.update_bias(rate)`: DeepSeek-V3's auxiliary-loss-free balancing, `b_e += rate * sign(mean load
  - load_e)` from the expert load counted since the last update (`expert_load`, counted in training mode). Under data
  or expert parallelism all-reduce `expert_load` (sum) over the ranks that share the router before calling it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


def balanced_indices(num_tokens: int, top_k: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """Round-robin assignment `[T, K]`: slot j of token t -> expert (t*K + j) mod E (distinct per token if K <= E)."""
    if top_k > num_experts:
        raise ValueError(f"balanced gate needs top_k ({top_k}) <= num_experts ({num_experts})")
    flat = torch.arange(num_tokens * top_k, device=device) % num_experts
    return flat.view(num_tokens, top_k)


class SoftmaxTopKRouter(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        top_k: int,
        *,
        norm_topk_prob: bool = False,
        scoring: str = "softmax",
        bias: bool = False,
        keep_fp32_weights: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.norm_topk_prob = norm_topk_prob
        self.scoring = scoring
        self.keep_fp32_weights = keep_fp32_weights
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.balanced = False

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.weight, self.bias)
        if self.scoring == "topk_softmax":
            if self.balanced:
                idx = balanced_indices(x.shape[0], self.top_k, self.num_experts, x.device)
                top = logits.gather(1, idx)
            else:
                top, idx = torch.topk(logits, self.top_k, dim=-1)
            return Routing(logits, F.softmax(top, dim=1, dtype=top.dtype), idx)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        if self.balanced:
            idx = balanced_indices(x.shape[0], self.top_k, self.num_experts, x.device)
            top = probs.gather(1, idx)
        else:
            top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        if not self.keep_fp32_weights:
            top = top.to(logits.dtype)
        return Routing(logits, top, idx)


class SigmoidGroupRouter(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        top_k: int,
        *,
        n_group: int | None = 1,
        topk_group: int | None = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group = n_group or 1
        self.topk_group = topk_group or self.n_group
        if num_experts % self.n_group:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by n_group ({self.n_group})")
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(num_experts, dtype=torch.float32))
        self.expert_load = nn.Buffer(torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.balanced = False
        self._keep_fp32 = True  # weight and bias stay fp32 (transformers' _keep_in_fp32_modules_strict)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k on `scores + bias` -> indices `[T, K]`."""
        choice = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            t = choice.shape[0]
            grouped = choice.view(t, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, -1)
        return torch.topk(choice, k=self.top_k, dim=-1, sorted=False).indices

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        if self.balanced:
            idx = balanced_indices(x.shape[0], self.top_k, self.num_experts, x.device)
        else:
            idx = self.select(scores.detach())
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        if self.training:
            with torch.no_grad():
                self.expert_load.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1), dtype=torch.float32))
        return Routing(logits, weights, idx)

    @torch.no_grad()
    def update_bias(self, rate: float = 1e-3, expert_load: torch.Tensor | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step (DeepSeek-V3 section 2.1.2): raise the bias of under-loaded experts and lower
        that of over-loaded ones by `rate`; `expert_load` defaults to the counts since the last call, then reset.
        Returns the load that was used."""
        load = self.expert_load.clone() if expert_load is None else expert_load.to(self.expert_load)
        self.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
        if expert_load is None:
            self.expert_load.zero_()
        return load


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, `E * sum_e f_e * P_e`, averaged over all layers' rows (transformers')."""
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows: torch.Tensor | float = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        probs = F.softmax(logits.to(device), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        if mask is None:
            counts = counts + torch.zeros_like(counts).scatter_add_(0, chosen, torch.ones_like(chosen, dtype=counts.dtype))
            prob_sum = prob_sum + probs.float().sum(dim=0)
            rows = rows + probs.shape[0]
        else:
            counts = counts + torch.zeros_like(counts).scatter_add_(0, chosen, mask.repeat_interleave(top_k))
            prob_sum = prob_sum + (probs.float() * mask[:, None]).sum(dim=0)
            rows = rows + mask.sum()
    return (counts / rows * prob_sum / rows).sum() * num_experts
