"""The zoo's output head as an FSDP2 unit of its own, and the gradient reduce dtype (gloo, 2 spawned ranks).

- With the head its own unit (`parallelize` registers `LMHead.loss` as an FSDP forward method), EP=2 training of a
  zoo qwen3_moe model gives every rank the single-process loss on its batch and every parameter the single-process
  gradient of the mean loss (float32, within 1e-5): the head's gradient is reduced like every other one.
- bf16 parameters: the gradients after a bf16 reduce equal those after an fp32 reduce bit for bit (2 ranks; the
  module docstring of `parallel.expert_parallel` says why), and "auto" picks bf16 only there.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from spawn_ranks import init_gloo, run_ranks


def tiny_zoo_model(dtype: torch.dtype = torch.float32):
    import transformers

    from automodel_convert.models import AutoModelForCausalLM

    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=20, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
                                      norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, "attn=eager", dtype=torch.float32, device="cpu")
    return model.to(dtype)


def batch(rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(70 + rank))


def full_grads(model, meshes) -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if p.dim() == 3:  # experts: each ep rank holds a dim-0 slice
            parts = [torch.empty(0)] * meshes.ep
            dist.all_gather_object(parts, g, group=meshes.ep_group)
            g = torch.cat(parts)
        out[n] = g
    return out


def worker(rank: int, world: int, dtype: torch.dtype, reduce_dtype) -> dict:  # noqa: ANN001
    from torch.distributed.fsdp import FSDPModule

    from automodel_convert.parallel import build_mesh
    from automodel_convert.parallel.expert_parallel import parallelize

    init_gloo()
    model = tiny_zoo_model(dtype)
    meshes = build_mesh(ep=2, device_type="cpu")
    parallelize(model, meshes, param_dtype=None, reduce_dtype=reduce_dtype, dispatcher="alltoall")
    ids = batch(rank, model.config.vocab_size)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = full_grads(model, meshes)
    return {"loss": loss.item(), "grads": grads if rank == 0 else None, "head_unit": isinstance(model.lm_head, FSDPModule),
            "reduce": model.grad_reduce_dtypes}


def test_head_unit_gradients_match_single_process():
    model = tiny_zoo_model()
    ref_losses = []
    for r in range(2):
        ids = batch(r, model.config.vocab_size)
        loss = model(input_ids=ids, labels=ids).loss
        (loss / 2).backward()
        ref_losses.append(loss.item())
    ref = {n: p.grad for n, p in model.named_parameters()}
    results = run_ranks(worker, 2, torch.float32, "auto")
    assert all(r["head_unit"] for r in results)
    assert results[0]["reduce"] == {"dense": torch.float32, "experts": torch.float32}  # fp32 parameters: fp32
    for rank, res in enumerate(results):
        assert abs(res["loss"] - ref_losses[rank]) <= 1e-5
    assert set(results[0]["grads"]) == set(ref)
    for n, g in results[0]["grads"].items():
        torch.testing.assert_close(g, ref[n], atol=1e-5, rtol=0, msg=n)


def test_bf16_reduce_is_bit_identical_to_fp32_on_two_ranks():
    fp32 = run_ranks(worker, 2, torch.bfloat16, torch.float32)
    auto = run_ranks(worker, 2, torch.bfloat16, "auto")
    assert auto[0]["reduce"]["dense"] == torch.bfloat16
    for a, b in zip(fp32, auto, strict=True):
        assert a["loss"] == b["loss"]
    for n, g in fp32[0]["grads"].items():
        assert g.dtype == torch.bfloat16
        assert torch.equal(g, auto[0]["grads"][n]), n


@pytest.mark.parametrize("size,stored,want", [(2, torch.bfloat16, torch.bfloat16), (4, torch.bfloat16, torch.float32),
                                               (2, torch.float32, torch.float32), (1, torch.bfloat16, torch.float32)])
def test_auto_reduce_dtype(size, stored, want):
    from automodel_convert.parallel.expert_parallel import grad_reduce_dtype

    assert grad_reduce_dtype("auto", size, stored) == want
    assert grad_reduce_dtype(torch.float32, size, stored) == torch.float32


def _ds_model():
    from automodel_convert.models import AutoModelForCausalLM
    from automodel_convert.models.testing import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"), "attn=eager", dtype=torch.bfloat16, device="cpu")


def _ds_worker(rank: int, world: int) -> dict:
    from automodel_convert.parallel import build_mesh
    from automodel_convert.parallel.expert_parallel import parallelize

    init_gloo()
    model = _ds_model()
    meshes = build_mesh(ep=2, device_type="cpu")
    parallelize(model, meshes, param_dtype=torch.bfloat16, dispatcher="alltoall")
    ids = batch(rank, model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = full_grads(model, meshes)  # collectives: every rank takes part
    return {"grads": grads if rank == 0 else None}


def test_bf16_model_with_fp32_routers_trains_under_ep():
    """DeepSeek-V3's routers stay fp32 in a bf16 model; FSDP2 needs one dtype per unit, so they are units of their
    own: EP=2 runs (it raised "FSDP expects uniform original parameter dtype" before) and its gradients match the
    single-process bf16 ones within bf16 rounding; the routers' stay fp32."""
    model = _ds_model()
    for r in range(2):
        ids = batch(r, model.config.vocab_size)
        (model(input_ids=ids, labels=ids).loss / 2).backward()
    ref = {n: p.grad.float() for n, p in model.named_parameters()}
    grads = run_ranks(_ds_worker, 2)[0]["grads"]
    routers = [n for n in grads if n.endswith("mlp.gate.weight")]
    assert routers and all(grads[n].dtype == torch.float32 for n in routers)
    for n, g in grads.items():
        scale = ref[n].abs().max().item()
        assert (g.float() - ref[n]).abs().max().item() <= 0.03 * scale + 1e-6, n
