"""The expert-parallel trainer: `python -m automodel_convert.train` (console script `automodel-train`).

    torchrun --nproc_per_node 8 -m automodel_convert.train --model Qwen/Qwen3-30B-A3B --ep 8 \\
        --data train.jsonl --seq 4096 --steps 1000 --save ./ckpt --save-every 200
    automodel-train ... --resume ./ckpt/step-200

Contract:
- World: torchrun's ranks (or one process without torchrun). `parallel.build_mesh(ep=...)`: every rank trains on its
  own data (dp = world) while holding 1/ep of the experts; ep must divide the world size.
- Model: a zoo family (`models/`), loaded with `from_pretrained(device_mesh=mesh)` so each rank reads only its
  experts' bytes (`--init random`: from `config.json` alone, for benchmarks), then `parallel.expert_parallel.
  parallelize`: experts `Shard(0)` over ep with all-to-all token dispatch, FSDP2 over the ranks holding the same
  experts, dense layers FSDP2 over dp; parameters in `--dtype` (bf16), gradients reduced in fp32; AdamW (fused on
  CUDA); `--ac` activation checkpointing per decoder layer.
- Checks before any weight is read: ep divides the world, the model type has a zoo model with EP support, `--seq`
  fits `max_position_embeddings`, the predicted per-GPU memory of parameters + gradients + optimizer fits the GPU.
  Each failure is one line and exit code 2.
- Metrics per step (rank 0): loss (mean over ranks), tokens/s per GPU, TFLOP/s and MFU (model FLOPs: 6 x active
  parameters + attention, against `--peak-tflops`), forward / backward / optimizer ms, peak memory, expert load
  balance (max / mean routed tokens per expert, averaged over MoE layers); printed with rich and written as JSON lines
  (`--metrics`, default `<save>/metrics.jsonl`). `bench/plot_metrics.py` draws them.
- Saving (`--save DIR --save-every N`, and after the last step): `DIR/step-N/model` is a standard HF checkpoint written
  by `parallel.save_sharded` (original per-expert layout by default, `--save-layout fused`), in the source's dtypes;
  `DIR/step-N/train_state/rank-R.pt` holds each rank's exact parameters, AdamW state and data position (plain tensors,
  loaded with `weights_only=True`); `trainer.json` the step and run shape. `step-N` appears atomically (staged as
  `.step-N.partial`). `--resume DIR/step-N` continues with the same world size and ep, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

from .convert.errors import ConvertError

EP_UNSUPPORTED = {"gpt_oss": "experts with biases and an interleaved layout"}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}


class TrainError(ValueError):
    """Bad arguments or an impossible run, found before any work: one line, exit code 2."""


@dataclass
class TrainArgs:
    model: str = ""
    data: str = "synthetic"
    ep: int = 1
    seq: int = 4096
    batch: int = 1
    steps: int = 100
    lr: float = 1e-5
    warmup: int = 0
    weight_decay: float = 0.0
    save: str | None = None
    save_every: int = 0
    save_layout: str = "original"
    resume: str | None = None
    ac: bool = False
    dtype: str = "bfloat16"
    init: str = "pretrained"
    num_layers: int | None = None
    backend: str = ""
    dispatcher: str = "auto"
    metrics: str | None = None
    seed: int = 0
    peak_tflops: float = 790.0
    quiet: bool = False
    device: str = "auto"
    cuda_graphs: bool = False
    overlap_optimizer: bool = False
    reshard_after_forward: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- checks and estimates


def load_config(args: TrainArgs):  # noqa: ANN201
    from transformers import AutoConfig

    from .convert.source import resolve_source

    if not args.model:
        raise TrainError("--model is required (a hub id or a checkpoint folder; with --init random, a folder with config.json)")
    try:
        config = AutoConfig.from_pretrained(str(resolve_source(args.model, None)))
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise TrainError(f"--model {args.model}: cannot read its config.json ({str(e).splitlines()[0]})") from e
    if args.num_layers is not None:
        if args.init != "random":
            raise TrainError("--num-layers changes the architecture; use it with --init random")
        config.num_hidden_layers = args.num_layers
        for name in ("layer_types", "mlp_layer_types"):
            if isinstance(getattr(config, name, None), list):
                setattr(config, name, getattr(config, name)[: args.num_layers])
    return config


def check_run(args: TrainArgs, config, world: int) -> None:  # noqa: ANN001
    from .models import get_model_class

    if args.ep < 1 or world % args.ep:
        raise TrainError(f"--ep {args.ep} does not divide the world size {world}; choose ep from {[d for d in range(1, world + 1) if world % d == 0]}")
    mt = config.model_type
    if get_model_class(mt) is None:
        from .models import MODEL_REGISTRY

        raise TrainError(f"model type {mt!r} has no zoo model for expert-parallel training; supported: {', '.join(sorted(set(MODEL_REGISTRY) - set(EP_UNSUPPORTED)))}")
    if mt in EP_UNSUPPORTED:
        raise TrainError(f"model type {mt!r} has no expert-parallel support yet ({EP_UNSUPPORTED[mt]})")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and args.seq > limit:
        raise TrainError(f"--seq {args.seq} is longer than the model allows (max_position_embeddings={limit}); use --seq {limit} or less")
    if args.seq < 1 or args.batch < 1 or args.steps < 1:
        raise TrainError("--seq, --batch and --steps must be positive")
    if args.save_layout not in ("original", "fused"):
        raise TrainError(f"--save-layout {args.save_layout!r}: use original or fused")
    if args.dtype not in DTYPES:
        raise TrainError(f"--dtype {args.dtype!r}: use bfloat16 or float32")
    if args.init not in ("pretrained", "random"):
        raise TrainError(f"--init {args.init!r}: use pretrained or random")
    if args.save and args.init == "random":
        raise TrainError("--save needs a checkpoint to save against; drop --init random")
    if args.overlap_optimizer and world != 1:
        raise TrainError("--overlap-optimizer needs one rank (run without torchrun): with FSDP/EP the gradients are reduced after backward")


def meta_model(config, backend):  # noqa: ANN001, ANN201
    import torch

    from .models import get_model_class

    with torch.device("meta"):
        return get_model_class(config.model_type)(config, backend)


def count_params(model) -> tuple[int, int, int]:  # noqa: ANN001
    """(total, expert, active-for-FLOPs) parameter counts of a (meta) model; embeddings are not FLOPs."""
    from .parallel.expert_parallel import experts_modules

    experts = {id(p) for _, m in experts_modules(model) for p in m.parameters(recurse=False)}
    cfg = model.config
    e = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_local_experts", 1)
    k = getattr(cfg, "num_experts_per_tok", 1)
    total = expert = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if id(p) in experts:
            expert += p.numel()
            active += p.numel() * k // e
        elif "embed_tokens" not in name and p.dim() >= 2:
            active += p.numel()
    return total, expert, active


def flops_per_token(config, active_params: int, seq: int) -> float:  # noqa: ANN001
    """6 x active parameters plus causal attention scores (QK^T and AV, forward + backward)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6 * active_params + 6 * config.num_hidden_layers * heads * head_dim * seq


def check_memory(total: int, expert: int, world: int, ep: int, param_bytes: int, device) -> float:  # noqa: ANN001
    """Predicted GiB per GPU of sharded parameters, gradients and AdamW state; an error if it cannot fit."""
    import torch

    per_param = 2 * param_bytes + 2 * param_bytes  # parameter, gradient, two AdamW moments (in the parameter dtype)
    need = (total * per_param) / world
    gib = need / 2**30
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        if need > 0.92 * have:
            raise TrainError(f"parameters + gradients + optimizer state need {gib:.1f} GiB per GPU (of {have / 2**30:.0f} GiB) before activations; use more GPUs")
    return gib


# ---------------------------------------------------------------- the trainer


def lr_at(args: TrainArgs, step: int) -> float:
    """Linear warmup over `--warmup` steps, then cosine decay to 10% at `--steps`."""
    if args.warmup and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - args.warmup) / span))))


class Trainer:
    """Everything one rank needs; `step()` runs one optimizer step and returns its metrics."""

    def __init__(self, args: TrainArgs) -> None:
        import torch

        from .models import AutoModelForCausalLM, BackendConfig
        from .parallel import build_mesh
        from .parallel.ep_dispatch import DispatcherError, choose_dispatcher
        from .parallel.expert_parallel import parallelize

        self.args = args
        self.resume_meta = self._read_resume(args) if args.resume else None
        self.config = load_config(args)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        check_run(args, self.config, world)
        if args.device not in ("auto", "cuda", "cpu"):
            raise TrainError(f"--device {args.device!r}: use auto, cuda or cpu")
        self.mesh = build_mesh(ep=args.ep, device_type=None if args.device == "auto" else args.device)
        try:  # before any weight is read: a dispatcher that cannot run here is one line
            chosen = choose_dispatcher(args.dispatcher, args.ep, self.mesh.device_type)
        except DispatcherError as e:
            raise TrainError(str(e)) from e
        self.dispatcher = chosen if args.ep > 1 else "local"  # one rank: every expert is local, nothing to send
        self.rank, self.world = self.mesh.rank, self.mesh.world
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.mesh.device_type == "cuda" else torch.device("cpu")
        self.dtype = getattr(torch, DTYPES[args.dtype])
        backend = BackendConfig(**dict(kv.split("=", 1) for kv in args.backend.split(",") if kv)) if args.backend else BackendConfig()
        meta = meta_model(self.config, backend)
        self.total_params, self.expert_params, self.active_params = count_params(meta)
        del meta
        self.flops_per_token = flops_per_token(self.config, self.active_params, args.seq)
        self.state_gib = check_memory(self.total_params, self.expert_params, self.world, args.ep, self.dtype.itemsize, self.device)

        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        if args.init == "random":
            self.model = AutoModelForCausalLM.from_config(self.config, backend, dtype=self.dtype, device=self.device)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=self.dtype, backend=backend, device=self.device, device_mesh=self.mesh)
        self.load_seconds = time.perf_counter() - t0
        self.source = getattr(self.model, "_sharded_source", None)
        self.meshes = self.mesh
        mp_dtype = None if self.dtype == torch.float32 else self.dtype
        parallelize(self.model, self.meshes, param_dtype=mp_dtype, reduce_dtype=torch.float32, activation_checkpointing=args.ac, dispatcher=self.dispatcher if args.ep > 1 else "auto", reshard_after_forward=args.reshard_after_forward)
        self.model.train()
        if args.cuda_graphs:  # replay each decoder layer's captured forward/backward (models/common/graphs.py)
            if self.device.type != "cuda" or self.world != 1:
                raise TrainError("--cuda-graphs needs one CUDA GPU (ep=1, no torchrun): EP dispatch sizes its all-to-all on the host")
            from .models.common.graphs import graph_decoder_layers

            graph_decoder_layers(self.model, args.batch, args.seq)
            from .parallel.expert_parallel import expert_load

            expert_load(self.model, reset=True)  # drop the counts of the capture's warm-up passes
        fused = self.device.type == "cuda"
        # foreach/fused kernels run per parameter group and cannot mix DTensors (FSDP) with plain tensors (experts
        # that need no reduction, see parallelize): one group each
        from torch.distributed.tensor import DTensor

        params = list(self.model.parameters())
        if args.overlap_optimizer:  # the same AdamW, stepped per parameter inside backward (train_optim.py)
            from .train_optim import OverlappedAdamW

            self.optimizer = OverlappedAdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=fused)
        else:
            groups = [g for g in ([p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]) if g]
            self.optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=fused, foreach=not fused)
        self.data = self._make_data()
        self.step_index = 0
        if self.resume_meta is not None:
            self._load_train_state(Path(args.resume))

    # ------------------------------------------------------------ data
    def _make_data(self):  # noqa: ANN202
        from .train_data import PackedJsonl, Synthetic

        if self.args.data == "synthetic":
            return Synthetic(self.config.vocab_size, self.args.seq, self.args.batch, self.args.seed, self.rank, self.device)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.args.model)
        except Exception as e:  # noqa: BLE001
            raise TrainError(f"--data {self.args.data}: the checkpoint has no usable tokenizer ({str(e).splitlines()[0]})") from e
        try:
            return PackedJsonl(self.args.data, tok, self.args.seq, self.args.batch, self.rank, self.world, self.device)
        except (FileNotFoundError, ValueError) as e:
            raise TrainError(str(e)) from e

    # ------------------------------------------------------------ one step
    def step(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        from .parallel.expert_parallel import expert_load

        cuda = self.device.type == "cuda"
        lr = lr_at(self.args, self.step_index)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        inputs, labels = next(self.data)
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
        t0 = time.perf_counter()
        loss = self.model(input_ids=inputs, shift_labels=labels).loss  # labels are already the next tokens
        ev[1].record() if cuda else None
        t1 = time.perf_counter()
        loss.backward()
        ev[2].record() if cuda else None
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ev[3].record() if cuda else None
        stats = loss.detach().float().reshape(1)
        load = expert_load(self.model)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(stats)
            if load is not None:
                dist.all_reduce(load)
        if cuda:
            torch.cuda.synchronize()
            fwd, bwd, opt = (ev[i].elapsed_time(ev[i + 1]) / 1e3 for i in range(3))
        else:
            t3 = time.perf_counter()
            fwd, bwd, opt = t1 - t0, t2 - t1, t3 - t2
        step_s = time.perf_counter() - t0
        self.step_index += 1
        tokens = self.args.batch * self.args.seq
        tps = tokens / step_s
        tflops = self.flops_per_token * tps / 1e12
        m = {
            "step": self.step_index,
            "loss": stats[0].item() / self.world,
            "lr": lr,
            "tokens_per_s_per_gpu": tps,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.args.peak_tflops,
            "step_ms": step_s * 1e3,
            "forward_ms": fwd * 1e3,
            "backward_ms": bwd * 1e3,
            "optimizer_ms": opt * 1e3,
            "peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else _rss_gib(),
        }
        if load is not None:
            lf = load.float()
            m["expert_load_max_over_mean"] = (lf.max(1).values / lf.mean(1).clamp_min(1e-9)).mean().item()
            m["expert_load_min_over_mean"] = (lf.min(1).values / lf.mean(1).clamp_min(1e-9)).mean().item()
        return m

    # ------------------------------------------------------------ save / resume
    def save(self, root: Path) -> Path:
        """`root/step-N` (model + train_state + trainer.json), atomically; collective."""
        import torch
        import torch.distributed as dist

        from .parallel import save_sharded

        final = root / f"step-{self.step_index}"
        staging = root / f".step-{self.step_index}.partial"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)
            (staging / "train_state").mkdir(parents=True)
        dist.barrier()
        from .convert.source import resolve_source

        source = resolve_source(self.args.model, None)
        save_sharded(self.export_state(), staging / "model", self.mesh, layout=self.args.save_layout, source=source)
        torch.save(self._train_state(), staging / "train_state" / f"rank-{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            meta = {"step": self.step_index, "world": self.world, "ep": self.args.ep, "model": self.args.model, "args": _jsonable(asdict(self.args))}
            (staging / "trainer.json").write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        dist.barrier()
        return final

    def export_state(self) -> dict:
        """The model as `save_sharded` takes it: names of the source checkpoint, expert tensors as `Shard(0)` DTensors
        over the ep mesh (gathered only over the ranks holding the same experts), in the source's dtypes."""
        import torch
        from torch.distributed.tensor import DTensor, Replicate, Shard

        from .convert.api import torch_dtype

        specs = self.source.specs
        out = {}
        from .parallel.expert_parallel import experts_modules

        experts = {id(p): m for _, m in experts_modules(self.model) for p in (m.gate_up_proj, m.down_proj)}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name not in specs:
                continue
            value = t.detach()
            mod = experts.get(id(t))
            if mod is not None:
                local = value.full_tensor() if isinstance(value, DTensor) else value
                E = mod._ep_num_experts
                shape = (E, *local.shape[1:])
                stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
                value = DTensor.from_local(local, self.mesh.ep_root, [Replicate(), Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)
            want = torch_dtype(specs[name].dtype)
            out[name] = value.to(want) if value.dtype != want else value
        return out

    def _train_state(self) -> dict:
        from torch.distributed.tensor import DTensor

        params, optim = {}, {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for n, p in self.model.named_parameters():
            params[n] = (p.to_local() if isinstance(p, DTensor) else p).detach().cpu().clone()
        for p, st in self.optimizer.state.items():
            optim[names[id(p)]] = {k: (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in st.items()}
        return {"step": self.step_index, "params": params, "optim": optim, "data": self.data.state_dict(), "rank": self.rank, "world": self.world}

    @staticmethod
    def _read_resume(args: TrainArgs) -> dict:
        path = Path(args.resume)
        meta_file = path / "trainer.json"
        if not meta_file.is_file():
            raise TrainError(f"--resume {path}: no trainer.json here; give a step folder written by --save (e.g. ./ckpt/step-200)")
        meta = json.loads(meta_file.read_text())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if meta["world"] != world or meta["ep"] != args.ep:
            raise TrainError(f"--resume {path}: saved with world {meta['world']} and ep {meta['ep']}; run with the same (now world {world}, ep {args.ep})")
        if not args.model:
            args.model = meta["model"]
        return meta

    def _load_train_state(self, path: Path) -> None:
        import torch
        from torch.distributed.tensor import DTensor

        st = torch.load(path / "train_state" / f"rank-{self.rank:05d}.pt", weights_only=True, map_location="cpu")
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                local.copy_(st["params"][n])
        for n, p in self.model.named_parameters():
            saved = st["optim"].get(n)
            if saved is None:
                continue
            state = {}
            for k, v in saved.items():
                if v.dim() == 0:  # AdamW's step counter: on the parameter's device for the fused kernel
                    state[k] = v.to(self.device) if self.device.type == "cuda" else v
                elif isinstance(p, DTensor):
                    state[k] = DTensor.from_local(v.to(self.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
                else:
                    state[k] = v.to(self.device)
            self.optimizer.state[p] = state
        self.data.load_state_dict(st["data"])
        self.step_index = int(st["step"])

    # ------------------------------------------------------------ loop
    def run(self, on_step=None) -> list[dict]:  # noqa: ANN001
        args = self.args
        history = []
        metrics_path = Path(args.metrics) if args.metrics else (Path(args.save) / "metrics.jsonl" if args.save else None)
        sink = None
        if self.rank == 0 and metrics_path is not None:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            sink = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        try:
            while self.step_index < args.steps:
                m = self.step()
                history.append(m)
                if sink is not None:
                    sink.write(json.dumps(m) + "\n")
                    sink.flush()
                if on_step is not None:
                    on_step(m)
                last = self.step_index == args.steps
                if args.save and ((args.save_every and self.step_index % args.save_every == 0) or last):
                    self.save(Path(args.save))
        finally:
            if sink is not None:
                sink.close()
        return history


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), dict, list))}


# ---------------------------------------------------------------- CLI


def _printer(args: TrainArgs, trainer: Trainer):  # noqa: ANN202
    from rich.console import Console

    console = Console(stderr=False, highlight=False)

    def show(m: dict) -> None:
        if args.quiet or trainer.rank != 0:
            return
        bal = f" | load max/mean {m['expert_load_max_over_mean']:.2f}" if "expert_load_max_over_mean" in m else ""
        console.print(
            f"[bold]step {m['step']:>5}[/] | loss {m['loss']:.4f} | {m['tokens_per_s_per_gpu']:,.0f} tok/s/GPU | "
            f"{m['tflops_per_gpu']:.1f} TFLOP/s | MFU {100 * m['mfu']:.1f}% | fwd {m['forward_ms']:.0f} bwd {m['backward_ms']:.0f} "
            f"opt {m['optimizer_ms']:.0f} ms | peak {m['peak_mem_gib']:.1f} GiB{bal}"
        )

    return console, show


def train(args: TrainArgs) -> list[dict]:
    """Run a training job (collective under torchrun); returns rank 0's metrics history."""
    import torch.distributed as dist

    trainer = Trainer(args)
    console, show = _printer(args, trainer)
    if trainer.rank == 0 and not args.quiet:
        console.print(
            f"[bold]{trainer.config.model_type}[/]: {trainer.total_params / 1e9:.2f}B parameters ({trainer.expert_params / 1e9:.2f}B in experts, "
            f"{trainer.active_params / 1e9:.2f}B active), world {trainer.world}, ep {args.ep}, dp {trainer.world}, seq {args.seq}, "
            f"batch {args.batch}/GPU, {args.dtype}, dispatcher {trainer.dispatcher}, loaded in {trainer.load_seconds:.1f} s, predicted state {trainer.state_gib:.1f} GiB/GPU"
            + (f", resumed at step {trainer.step_index}" if args.resume else "")
        )
    history = trainer.run(show)
    if dist.is_initialized():
        dist.barrier()
    return history


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Expert-parallel MoE training (run under torchrun for several GPUs).")


@app.command()
def cli(
    model: str = typer.Option("", help="hub id or checkpoint folder (any supported layout)"),
    data: str = typer.Option("synthetic", help="JSON-lines file of {'text': ...} or 'synthetic'"),
    ep: int = typer.Option(1, help="expert-parallel degree (divides the number of ranks)"),
    seq: int = typer.Option(4096, help="sequence length"),
    batch: int = typer.Option(1, help="sequences per GPU per step"),
    steps: int = typer.Option(100, help="total optimizer steps"),
    lr: float = typer.Option(1e-5),
    warmup: int = typer.Option(0, help="linear warmup steps"),
    weight_decay: float = typer.Option(0.0),
    save: str | None = typer.Option(None, help="checkpoint folder (step-N subfolders)"),
    save_every: int = typer.Option(0, help="save every N steps (and after the last)"),
    save_layout: str = typer.Option("original", help="original (per-expert) or fused"),
    resume: str | None = typer.Option(None, help="a step-N folder written by --save"),
    ac: bool = typer.Option(False, "--ac", help="activation checkpointing per decoder layer"),
    dtype: str = typer.Option("bfloat16", help="parameter dtype (gradients are reduced in fp32)"),
    init: str = typer.Option("pretrained", help="pretrained, or random (config only, benchmarks)"),
    num_layers: int | None = typer.Option(None, help="override num_hidden_layers (with --init random)"),
    backend: str = typer.Option("", help="BackendConfig as key=value,..."),
    dispatcher: str = typer.Option("auto", help="token dispatcher for ep > 1: auto (deepep where deep_ep imports on CUDA, else alltoall), alltoall, deepep"),
    metrics: str | None = typer.Option(None, help="JSON-lines metrics file (default <save>/metrics.jsonl)"),
    seed: int = typer.Option(0),
    peak_tflops: float = typer.Option(790.0, help="bf16 TFLOP/s per GPU that MFU is relative to (790: the H200's measured matmul ceiling)"),
    quiet: bool = typer.Option(False, "--quiet"),
    device: str = typer.Option("auto", help="auto (cuda when available), cuda or cpu (gloo)"),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="experimental: CUDA graphs per decoder layer (one GPU, ep=1)"),
    overlap_optimizer: bool = typer.Option(False, "--overlap-optimizer", help="step AdamW per parameter inside backward (one rank; lower peak memory)"),
    reshard_after_forward: bool = typer.Option(True, "--reshard-after-forward/--no-reshard-after-forward", help="FSDP2: free gathered dense parameters after forward (less memory) or keep them for backward (one all-gather fewer)"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    args = TrainArgs(model, data, ep, seq, batch, steps, lr, warmup, weight_decay, save, save_every, save_layout, resume, ac, dtype, init, num_layers, backend, dispatcher, metrics, seed, peak_tflops, quiet, device=device, cuda_graphs=cuda_graphs, overlap_optimizer=overlap_optimizer, reshard_after_forward=reshard_after_forward)
    try:
        train(args)
    except (TrainError, ValueError, FileNotFoundError, NotImplementedError, ConvertError, OSError) as e:
        if debug:
            raise
        print(f"automodel-train: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        rc = app(args=argv, prog_name="automodel-train", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # usage errors (typer's bundled click)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
