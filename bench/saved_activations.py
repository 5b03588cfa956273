"""Bytes of activations one MoE decoder layer keeps for backward: ours, ours with `expert_recompute`, transformers v5.

Runs on CPU (no GPU needed): a 1-layer model at Qwen3-30B-A3B shapes (hidden 2048, 128 experts, top-8, expert
width 768, 32 query / 4 KV heads of 128) with a small vocabulary, one forward of `--tokens` tokens under a
`saved_tensors_hooks` that records every storage the autograd graph keeps (each counted once). Saved activations
grow linearly with tokens, so the figure per 4096 tokens is printed too, beside transformers' from the same run.

    python bench/saved_activations.py --tokens 1024
"""

from __future__ import annotations

import argparse

import torch
import transformers

from automodel_convert.models import AutoModelForCausalLM
from automodel_convert.models.backend import BackendConfig


def qwen3_30b_layer(vocab: int) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=1,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=32768,
    )


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages the graph of one forward keeps (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
    del out
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = qwen3_30b_layer(args.vocab)
    ids = torch.randint(0, args.vocab, (1, args.tokens))
    rows = {}
    for name, backend in (("ours", BackendConfig()), ("ours + expert_recompute", BackendConfig(expert_recompute=True))):
        model = AutoModelForCausalLM.from_config(cfg, backend, dtype=torch.bfloat16, device="cpu")
        rows[name] = saved_bytes(model, ids)
        del model
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    rows["transformers v5 (anchor)"] = saved_bytes(hf, ids)
    scale = 4096 / args.tokens
    print(f"saved activations of one Qwen3-30B-A3B decoder layer (+ embedding/head at vocab {args.vocab}), bf16, CPU")
    print(f"{'model':28s} {args.tokens:>6d} tokens   per 4096 tokens   x transformers")
    anchor = rows["transformers v5 (anchor)"]
    for name, b in rows.items():
        print(f"{name:28s} {b / 2**20:10.1f} MiB   {b * scale / 2**20:10.1f} MiB   {b / anchor:8.2f}x")
    saved = (rows["ours"] - rows["ours + expert_recompute"]) * scale
    print(f"expert_recompute frees {saved / 2**20:.1f} MiB per layer per 4096 tokens ({16 * saved / 2**30:.2f} GiB at 16 layers)")


if __name__ == "__main__":
    main()
