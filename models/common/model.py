"""The decoder-only causal LM shared by the zoo: embeddings, decoder layers, final norm, lm_head, loss.

Contract:
- Parameter names are transformers v5's: `model.embed_tokens.weight`, `model.layers.{i}.{self_attn,mlp,
  input_layernorm,post_attention_layernorm}...`, `model.norm.weight`, `lm_head.weight` (tied to the embeddings when
  `config.tie_word_embeddings`). A family file subclasses `MoECausalLM` and implements `build_layer(i)` (an
  attention variant and a feed-forward variant composed in a `DecoderLayer`); `rotary()` gives its rope.
- `forward(input_ids [B, S] | inputs_embeds, attention_mask [B, S] (1 = keep) | None, position_ids, labels,
  output_router_logits, return_logits, num_items_in_batch, shift_labels, logits_to_keep, cache, use_cache)` returns
  transformers' `MoeCausalLMOutputWithPast`. KV cache: pass a transformers `DynamicCache` as `cache` (or
  `use_cache=True` for a new one); the S tokens then follow the cached ones (attention_mask, when given, covers
  cached + new tokens, position_ids default to past..past+S-1) and the output's `cache` is that cache. Without
  either, no cache is made (unlike transformers, whose `config.use_cache` defaults to True: the zoo is for training). With labels the loss runs `backend.loss` (chunked by default: logits are then NOT
  returned unless `return_logits=True`); plus `router_aux_loss_coef * aux_loss` when the family has an auxiliary
  loss and router logits are requested (argument or `config.output_router_logits`), like transformers.
- `from_config(config, backend, dtype, device)`, `from_pretrained(...)`, `save_pretrained(dst, layout)`:
  see models/auto.py and models/common/io.py. `init_weights()` initialises like transformers' `_init_weights`.
- `set_gate("native" | "balanced")` switches every router (balanced: benchmarking only, see router.py).
- `gradient_checkpointing_enable()` recomputes each decoder layer in backward (not in a pass with a KV cache).
- `generate(...)`: transformers' GenerationMixin (models/common/generation.py); `generation_config` is derived from
  the config (`from_model_config`) and replaced by the checkpoint's generation_config.json in `from_pretrained`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backend import BackendConfig, as_backend
from .attention import GQAttention, Masks
from .experts import GroupedExperts
from .generation import ZooGenerationMixin, check_cache, default_generation_config
from .loss import LMHead
from .norms import RMSNorm, make_rms_norm
from .rotary import RotaryEmbedding
from .router import SigmoidGroupRouter, SoftmaxTopKRouter, load_balancing_loss


class DecoderLayer(nn.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `h + mlp(norm(h))`; returns (out, router_logits | None)."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module, post_attention_layernorm: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: Masks) -> tuple[torch.Tensor, Any]:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, masks)
        out = self.mlp(self.post_attention_layernorm(h))
        logits = None
        if isinstance(out, tuple):
            out, logits = out
        return h + out, logits


class DecoderStack(nn.Module):
    """The `model.` prefix: embeddings, layers, final norm and the rotary embedding (no persistent state)."""

    def __init__(self, embed: nn.Embedding, layers: list[nn.Module], norm: nn.Module, rotary_emb: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rotary_emb = rotary_emb


def sliding_window_for(config, layer_idx: int) -> int | None:  # noqa: ANN001
    """transformers' rule: per-layer `layer_types` when the config has them, else `sliding_window` for all layers."""
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def is_sparse_layer(config, layer_idx: int) -> bool:  # noqa: ANN001
    """MoE or dense MLP for this layer: `mlp_only_layers`, `decoder_sparse_step` (Qwen) and `first_k_dense_replace`
    (DeepSeek, GLM, dots1)."""
    if layer_idx in (getattr(config, "mlp_only_layers", None) or []):
        return False
    step = getattr(config, "decoder_sparse_step", None) or 1
    if (layer_idx + 1) % step:
        return False
    return layer_idx >= (getattr(config, "first_k_dense_replace", None) or 0)


def _default_device() -> torch.device:
    return torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")


class MoECausalLM(nn.Module, ZooGenerationMixin):
    model_type: ClassVar[str] = ""
    has_aux_loss: ClassVar[bool] = False  # transformers adds the load-balancing loss for this family
    rope_style: ClassVar[str] = "half"
    norm_cast_before_weight: ClassVar[bool] = True  # False: GPT-OSS rounds after the weight multiply
    keep_fp32_for_fp16: ClassVar[tuple[str, ...]] = ()  # transformers' `_keep_in_fp32_modules` (fp16 only)

    def __init__(self, config, backend: BackendConfig | dict | str | None = None) -> None:  # noqa: ANN001
        super().__init__()
        self.config = config
        self.backend = as_backend(backend)
        if self.backend.compile and not hasattr(nn.Module, "compile"):
            raise RuntimeError("BackendConfig(compile=True) needs torch >= 2.2 (nn.Module.compile)")
        embed = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        layers = [self.build_layer(i) for i in range(config.num_hidden_layers)]
        for i, layer in enumerate(layers):
            layer.self_attn.layer_idx = i
        self.model = DecoderStack(embed, layers, self.norm(config.hidden_size), self.rotary())
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.generation_config = default_generation_config(config)
        if self.backend.compile:
            for layer in self.model.layers:
                layer.self_attn.compile()
                layer.input_layernorm.compile()
                layer.post_attention_layernorm.compile()

    # ------------------------------------------------------------ family hooks and helpers

    def build_layer(self, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def rotary(self) -> nn.Module:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return RotaryEmbedding(c, head_dim, "gpt_oss" if self.rope_style == "gpt_oss" else "half")

    def norm(self, dim: int, eps: float | None = None) -> nn.Module:
        eps = self.config.rms_norm_eps if eps is None else eps
        return make_rms_norm(dim, eps, self.backend.rms_norm, cast_before_weight=self.norm_cast_before_weight)

    def gqa(self, layer_idx: int, **kwargs: Any) -> GQAttention:
        """Grouped-query attention sized from the config; `kwargs` choose the variant (biases, qk_norm, sinks...)."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        args: dict[str, Any] = dict(
            norm_eps=c.rms_norm_eps, sliding_window=sliding_window_for(c, layer_idx),
            dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0), rope_style=self.rope_style,
            impl=self.backend.attn, linear_impl=self.backend.linear, norm_impl=self.backend.rms_norm,
            rope_impl=self.backend.rope,
        )
        args.update(kwargs)
        return GQAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim, **args)

    def layer(self, attn: nn.Module, mlp: nn.Module) -> DecoderLayer:
        return DecoderLayer(attn, mlp, self.norm(self.config.hidden_size), self.norm(self.config.hidden_size))

    def experts(self, num_experts: int, intermediate: int, **kwargs: Any) -> GroupedExperts:
        c = self.config
        return GroupedExperts(
            num_experts, c.hidden_size, intermediate, act=getattr(c, "hidden_act", "silu"), impl=self.backend.experts,
            swiglu_impl=self.backend.swiglu, recompute=self.backend.expert_recompute, **kwargs,
        )

    @property
    def num_experts(self) -> int:
        for m in self.modules():
            if isinstance(m, GroupedExperts):
                return m.num_experts
        return 0

    @property
    def top_k(self) -> int:
        return int(self.config.num_experts_per_tok)

    # ------------------------------------------------------------ weights, dtype, device

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers-style init: normal(0, initializer_range) for matrices, zeros for biases, ones for norms."""
        std = getattr(self.config, "initializer_range", 0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, RMSNorm) or (hasattr(m, "weight") and "norm" in name.rsplit(".", 1)[-1]):
                m.weight.fill_(1.0)
            elif isinstance(m, GroupedExperts):
                for pname, p in m.named_parameters(recurse=False):
                    p.zero_() if pname.endswith("_bias") else p.normal_(0.0, std)
            elif isinstance(m, (SoftmaxTopKRouter, SigmoidGroupRouter)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, std)
                if isinstance(m, SigmoidGroupRouter):
                    m.e_score_correction_bias.zero_()
                    m.expert_load.zero_()
            if getattr(m, "sinks", None) is not None:
                m.sinks.normal_(0.0, std)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (rotary frequencies), e.g. after `to_empty` from the meta device."""
        device = torch.device(device) if device is not None else self.lm_head.weight.device
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.reset_parameters(device)
            if isinstance(m, SigmoidGroupRouter):
                m.expert_load = nn.Buffer(torch.zeros(m.num_experts, device=device), persistent=False)

    def cast(self, dtype: torch.dtype | None) -> MoECausalLM:
        """Cast floating parameters to `dtype` (None: leave them), keeping sigmoid routers (weight, bias) fp32 like
        transformers, and `keep_fp32_for_fp16` modules fp32 when dtype is float16."""
        for name, m in self.named_modules():
            keep = getattr(m, "_keep_fp32", False) or (
                dtype == torch.float16 and name.rsplit(".", 1)[-1] in self.keep_fp32_for_fp16
            )
            target = torch.float32 if keep else dtype
            if target is None:
                continue
            for p in m.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(target)
            for bname, b in m.named_buffers(recurse=False):
                if b.is_floating_point() and not keep and bname != "inv_freq":
                    setattr(m, bname, b.to(target))
        return self

    def set_gate(self, mode: str) -> None:
        if mode not in ("native", "balanced"):
            raise ValueError("gate must be 'native' or 'balanced'")
        for m in self.modules():
            if isinstance(m, (SoftmaxTopKRouter, SigmoidGroupRouter)):
                m.balanced = mode == "balanced"

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.gradient_checkpointing = enable

    def update_router_bias(self, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing step on every sigmoid router (see router.SigmoidGroupRouter.update_bias)."""
        for m in self.modules():
            if isinstance(m, SigmoidGroupRouter):
                m.update_bias(rate)

    # ------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        return_logits: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        cache: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ):  # noqa: ANN201 - transformers' MoeCausalLMOutputWithPast
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        masks = self._masks(x, attention_mask, cache if cache is not None else kwargs.get("past_key_values"), use_cache)
        if position_ids is None:
            b, s = x.shape[:2]
            position_ids = torch.arange(masks.past, masks.past + s, device=x.device)[None].expand(b, s)
        x, router_logits = self._layers(x, position_ids, masks)
        hidden = self.model.norm(x)
        if attention_mask is not None and masks.cache is not None:
            attention_mask = attention_mask[:, -x.shape[1]:]  # the new tokens' mask, for the load-balancing loss

        want_router = output_router_logits if output_router_logits is not None else getattr(self.config, "output_router_logits", False)
        loss = aux_loss = logits = None
        if labels is not None or shift_labels is not None:
            loss = self.lm_head.loss(
                hidden, labels, impl=self.backend.loss, chunk_tokens=self.backend.loss_chunk_tokens,
                num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
            )
        if return_logits or (return_logits is None and loss is None):
            keep = hidden if not logits_to_keep else hidden[:, -logits_to_keep:]
            logits = self.lm_head(keep)
        if want_router and self.has_aux_loss and router_logits:
            aux_loss = load_balancing_loss(router_logits, self.num_experts, self.top_k, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, router_logits=tuple(router_logits) if want_router else None,
            cache=masks.cache,
        )

    def _masks(self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any, use_cache: bool | None) -> Masks:
        """The pass's masks and KV cache: `cache` as given, a new DynamicCache for `use_cache=True`, else none."""
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        if cache is not None:
            check_cache(cache)
        past = cache.get_seq_length() if cache is not None else 0
        return Masks(attention_mask, x.shape[1], x.device, cache=cache, past=past)

    def _layers(self, x: torch.Tensor, position_ids: torch.Tensor, masks: Masks) -> tuple[torch.Tensor, list]:
        """Run the decoder layers; returns the last hidden states and each MoE layer's router logits."""
        cos, sin = self.model.rotary_emb(x, position_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and masks.cache is None
        router_logits = []
        for layer in self.model.layers:
            if recompute:
                x, logits = checkpoint(layer, x, cos, sin, masks, use_reentrant=False)
            else:
                x, logits = layer(x, cos, sin, masks)
            if logits is not None:
                router_logits.append(logits)
        return x, router_logits

    # ------------------------------------------------------------ construction and checkpoints

    @classmethod
    def from_config(
        cls,
        config,  # noqa: ANN001
        backend: BackendConfig | dict | str | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init: bool = True,
    ) -> MoECausalLM:
        """Build on the meta device, materialise on `device` in `dtype`, initialise (random) weights."""
        device = torch.device(device) if device is not None else _default_device()
        previous = torch.get_default_dtype()
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)  # parameters are born in `dtype`: no fp32 copy on the device
        try:
            with torch.device("meta"):
                model = cls(config, backend)
        finally:
            torch.set_default_dtype(previous)
        model.to_empty(device=device)
        model.tie_weights()
        model.cast(dtype)
        if init:
            model.init_weights()
        else:
            model.reset_buffers(device)
        return model

    @classmethod
    def from_pretrained(cls, src: str, **kwargs: Any) -> MoECausalLM:
        from ..auto import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(src, model_class=cls, **kwargs)

    def save_pretrained(self, dst: str, *, layout: str = "original", **kwargs: Any) -> None:
        """Write a checkpoint folder: weights, config.json (its `dtype` the model's, `self.dtype`) and
        generation_config.json (`self.generation_config`). Tensors that loading widened on its own (fp32 routers of a
        bf16 checkpoint) go back to their checkpoint dtype, so an untouched model round-trips bit for bit."""
        from .io import save_state_dict

        sd = self.state_dict()
        for name, dtype in getattr(self, "_source_dtypes", {}).items():
            if name in sd:
                sd[name] = sd[name].to(dtype)
        kwargs.setdefault("generation_config", self.generation_config)
        save_state_dict(sd, dst, config=self.config, layout=layout, **kwargs)

    def tie_weights(self) -> None:
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ANN001, ANN201
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.tie_weights()
        return result

