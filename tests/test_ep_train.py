"""Expert parallelism + FSDP2 on one mesh equals single-process training (gloo, spawned ranks, float32).

For EP=2 (world 2), EP=4 (world 4) and EP=2 x dp 2 (world 4) on tiny qwen3_moe and deepseek_v3 models: every rank's
loss equals the single-process loss on that rank's batch, and after backward every parameter's full gradient equals
the single-process gradient of the mean loss, within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from spawn_ranks import init_gloo, run_ranks


def tiny_model(kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=20, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
                                          norm_topk_prob=True, tie_word_embeddings=False)
        return transformers.Qwen3MoeForCausalLM(cfg).float()
    cfg = transformers.DeepseekV3Config(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=20, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, tie_word_embeddings=False)
    model = transformers.DeepseekV3ForCausalLM(cfg).float()
    for n, b in model.named_buffers():
        if n.endswith("e_score_correction_bias"):
            b.copy_(torch.randn_like(b) * 0.1)
    return model


def batch(rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(50 + rank))


def reference(kind: str, world: int):
    model = tiny_model(kind)
    losses = []
    for r in range(world):
        ids = batch(r, model.config.vocab_size)
        loss = model(input_ids=ids, labels=ids).loss
        (loss / world).backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def worker(rank: int, world: int, ep: int, kind: str) -> dict:
    from automodel_convert.parallel import build_mesh
    from automodel_convert.parallel.expert_parallel import parallelize

    init_gloo()
    model = tiny_model(kind)
    meshes = build_mesh(ep=ep, device_type="cpu")
    parallelize(model, meshes, param_dtype=None, reduce_dtype=torch.float32)
    ids = batch(rank, model.config.vocab_size)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if p.dim() == 3 and ("gate_up_proj" in n or "down_proj" in n):
            # experts: gather the ep shards (each rank holds a slice along dim 0)
            parts = [torch.empty(0)] * ep
            dist.all_gather_object(parts, g, group=meshes.ep_group)
            g = torch.cat(parts)
        grads[n] = g
    return {"loss": loss.item(), "grads": grads if rank == 0 else None}


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)])
def test_ep_fsdp_matches_single_process(kind, world, ep):
    ref_losses, ref_grads = reference(kind, world)
    results = run_ranks(worker, world, ep, kind)
    for rank, res in enumerate(results):
        assert abs(res["loss"] - ref_losses[rank]) <= 1e-5, (rank, res["loss"], ref_losses[rank])
    grads = results[0]["grads"]
    assert set(grads) == set(ref_grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=0, msg=n)
