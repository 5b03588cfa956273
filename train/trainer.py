"""The expert-parallel trainer: `Trainer(TrainConfig)` builds everything one rank needs; `run()` trains.

Contract:
- Order of work, so mistakes cost nothing: resume folder and its arguments (`checkpoint.resolve_resume`,
  `config.merge_resumed`), the model's config and run checks (`checks.py`), the tokenizer, the `--data` source, then
  the device mesh, then tokenization (split over ranks, `data.py`), and only then the weights. Each failure before
  the weights is one line, exit code 2.
- Model: a zoo family, loaded with `from_pretrained(device_mesh=mesh)` (each rank reads only its experts' bytes;
  `--init random`: from config.json alone), then `parallel.expert_parallel.parallelize` (experts `Shard(0)` over
  ep with token dispatch, FSDP2 over dp), parameters in `--dtype`, gradients reduced in `--reduce-dtype` (auto: bf16 only where bit-identical to fp32), AdamW (fused on CUDA).
- A step: `--grad-accum` micro-batches, each loss a sum over its targets divided by the rank's target count over
  the whole step (so accumulating k micro-batches of b equals one batch of k x b); then the global gradient norm and
  `--grad-clip` (`control.py`), the `--lr-schedule` learning rate, AdamW, and the aux-loss-free router bias update
  (`--router-bias-rate`, loads summed over ranks so replicas stay equal). Packed documents get attention inside
  each document (`masking.py`: varlen_attn on CUDA in bf16, else an explicit block-causal mask; `--doc-attention`;
  planned per layer before the weights load, then shown in the banner and each metrics row) unless
  `--packing-mask causal`.
- Resume: the run's arguments come from `trainer.json` (`config.merge_resumed`), its shape (`--ep`, dispatcher,
  backend, ...) too unless given; a restored value that cannot run here is one line naming the option.
- Saving (`--save RUN`, `--save-every N`, after the last step, on SIGINT/SIGTERM): `RUN/step-N/model` is a standard
  HF checkpoint (`parallel.save_sharded`, the tokenizer beside it), `train_state/` a DCP checkpoint and
  `trainer.json` the step, data position and arguments (`checkpoint.py`). Each save prints "saved step-N to PATH".
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .checks import check_memory, check_run, count_params, flops_per_token, load_config, load_tokenizer, meta_model
from .config import DTYPES, TrainConfig, TrainError, merge_resumed, restored_shape
from .control import clip_grads, lr_at
from .sources import resolve, shard


class Trainer:
    """Everything one rank needs; `step()` runs one optimizer step and returns its metrics."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.resume_path, self.resume_meta = (None, None)
        self.restored: dict[str, Any] = {}  # run-shape arguments taken from trainer.json
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.resume:
            self.resume_path, self.resume_meta = ckpt.resolve_resume(cfg.resume)
            self.restored = restored_shape(cfg, self.resume_meta["args"])
            cfg = merge_resumed(cfg, self.resume_meta["args"], cfg.resume)
            if "ep" in self.restored and world % cfg.ep:
                raise TrainError(f"--resume {cfg.resume}: the run was trained with --ep {cfg.ep}, which does not divide the world "
                                 f"size {world} here; give --ep from {[d for d in range(1, world + 1) if world % d == 0]} (the "
                                 "train state reshards to any ep)")
        self.cfg = self.args = cfg
        self.run_id = self.resume_meta.get("run_id", "") if self.resume_meta else uuid.uuid4().hex[:12]
        self.config = load_config(cfg)
        self._configure_aux_loss()
        try:
            check_run(cfg, self.config, world)
        except TrainError as e:
            raise TrainError(str(e) + self._restored_note()) from None
        self.tokenizer = load_tokenizer(cfg, self.config.vocab_size)
        self.source = resolve(cfg.data)
        self.eval_source = resolve(cfg.eval_data, "--eval-data") if cfg.eval_data else None
        backend = cfg.backend_config()
        self._build_mesh()
        if cfg.cuda_graphs and (self.device.type != "cuda" or self.world != 1):  # before the weights
            raise TrainError("--cuda-graphs needs one CUDA GPU (ep=1, no torchrun): EP dispatch sizes its all-to-all on the host"
                             + self._restored_note())
        if cfg.save:
            self._claim(Path(cfg.save))
        self.dtype = getattr(torch, DTYPES[cfg.dtype])
        meta = meta_model(self.config, backend)
        self.total_params, self.expert_params, self.active_params = count_params(meta)
        self.doc_plan = self._plan_documents(meta)
        del meta
        self.flops_per_token = flops_per_token(self.config, self.active_params, cfg.seq)
        self.state_gib = check_memory(self.total_params, self.world, self.dtype.itemsize, self.device)
        self.data = self._make_data(self.source, cfg.data)
        self.eval_data = self._make_data(self.eval_source, cfg.eval_data) if self.eval_source else None
        self._load_model(backend)
        self._make_optimizer()
        self.step_index = 0
        self.stop_requested = False  # the ranks' agreed decision, taken in step()
        self.signalled: str | None = None  # this rank's SIGINT/SIGTERM, set only by the handler
        if self.resume_path is not None:
            ckpt.load_train_state(self.resume_path / "train_state", self.model, self.optimizer, self.mesh.ep_root, self.device)
            self.data.load_state_dict(self.resume_meta["data"])
            self.step_index = int(self.resume_meta["step"])

    # ------------------------------------------------------------ construction
    def _restored_note(self) -> str:
        """For an error about the run's shape: which of it came from trainer.json, and how to change it."""
        usual = {"ep": 1}
        moved = {n: v for n, v in self.restored.items() if v != usual.get(n, TrainConfig.__dataclass_fields__[n].default)}
        if not moved:
            return ""
        def flag(name: str, value: Any) -> str:
            d = name.replace("_", "-")
            return f"--{d}" if value is True else f"--no-{d}" if value is False else f"--{d} {value}"

        return f" (restored from the resumed run: {', '.join(flag(n, v) for n, v in moved.items())}; give another value to change it)"

    def _configure_aux_loss(self) -> None:
        coef = self.cfg.aux_loss_coef
        if coef is not None:
            self.config.output_router_logits = coef > 0
            self.config.router_aux_loss_coef = coef

    def _build_mesh(self) -> None:
        from ..parallel import build_mesh
        from ..parallel.ep_dispatch import DispatcherError, choose_dispatcher

        cfg = self.cfg
        self.mesh = build_mesh(ep=cfg.ep, device_type=None if cfg.device == "auto" else cfg.device)
        try:  # before any weight is read: a dispatcher that cannot run here is one line
            chosen = choose_dispatcher(cfg.dispatcher, cfg.ep, self.mesh.device_type)
        except DispatcherError as e:
            raise TrainError(str(e)) from e
        self.dispatcher = chosen if cfg.ep > 1 else "local"
        self.rank, self.world = self.mesh.rank, self.mesh.world
        cuda = self.mesh.device_type == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def _plan_documents(self, meta: Any) -> tuple[dict[str, int], list[str]] | None:
        """Which kernel keeps packed documents apart in each attention layer (`masking.plan`); an impossible one (e.g.
        `--doc-attention varlen` on CPU, attn=flash with a sliding-window layer) is one line before the weights load."""
        from .masking import plan

        cfg = self.cfg
        packed = any(s is not None and s.kind != "synthetic" for s in (self.source, self.eval_source))
        if cfg.packing_mask != "document" or not packed:
            return None
        try:
            return plan(meta, self.device.type, self.dtype, cfg.doc_attention)
        except NotImplementedError as e:
            raise TrainError(f"--packing-mask document: {e}") from None

    def _make_data(self, source: Any, spec: str) -> Any:
        from .data import Packed, Synthetic, tokenize

        cfg = self.cfg
        if source.kind == "synthetic":
            return Synthetic(self.config.vocab_size, cfg.seq, cfg.batch, cfg.seed, self.rank, self.world, self.device)
        show = self.rank == 0 and not cfg.quiet
        recs = shard(source, cfg.data_split, cfg.data_streaming, self.rank, self.world)  # this rank's records only
        stream = tokenize(recs, self.tokenizer, cfg.data_field, self.rank, self.world, self.config.vocab_size, show)
        return Packed(stream, cfg.seq, cfg.batch, self.rank, self.world, cfg.seed, self.device, shuffle=spec == cfg.data)

    def _load_model(self, backend: Any) -> None:
        from ..models import AutoModelForCausalLM
        from ..parallel.expert_parallel import parallelize
        from .masking import DocumentMasking

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        if cfg.init == "random":
            self.model = AutoModelForCausalLM.from_config(self.config, backend, dtype=self.dtype, device=self.device)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=self.dtype, backend=backend, device=self.device, device_mesh=self.mesh)
            self._configure_model_config()
        self.load_seconds = time.perf_counter() - t0
        self.hf_source = getattr(self.model, "_sharded_source", None)
        mp_dtype = None if self.dtype == torch.float32 else self.dtype
        reduce = cfg.reduce_dtype if cfg.reduce_dtype == "auto" else getattr(torch, cfg.reduce_dtype)
        parallelize(self.model, self.mesh, param_dtype=mp_dtype, reduce_dtype=reduce, activation_checkpointing=cfg.ac,
                    dispatcher=self.dispatcher if cfg.ep > 1 else "auto", reshard_after_forward=cfg.reshard_after_forward,
                    max_tokens=cfg.batch * cfg.seq)
        self.model.train()
        self.masking = DocumentMasking(self.model, cfg.doc_attention) if cfg.packing_mask == "document" else None
        if cfg.cuda_graphs:
            self._graph_layers()

    def _configure_model_config(self) -> None:
        if self.cfg.aux_loss_coef is not None:
            self.model.config.output_router_logits = self.cfg.aux_loss_coef > 0
            self.model.config.router_aux_loss_coef = self.cfg.aux_loss_coef

    def _graph_layers(self) -> None:
        if self.device.type != "cuda" or self.world != 1:
            raise TrainError("--cuda-graphs needs one CUDA GPU (ep=1, no torchrun): EP dispatch sizes its all-to-all on the host")
        from ..models.common.graphs import graph_decoder_layers
        from ..parallel.expert_parallel import expert_load

        graph_decoder_layers(self.model, self.cfg.batch, self.cfg.seq)
        expert_load(self.model, reset=True)  # drop the counts of the capture's warm-up passes

    def _make_optimizer(self) -> None:
        from torch.distributed.tensor import DTensor

        cfg, fused = self.cfg, self.device.type == "cuda"
        params = list(self.model.parameters())
        # FSDP parameters (DTensors) and plain ones (everything on one rank; the experts at ep = world) apart:
        # foreach/fused kernels cannot mix them, and only plain ones have their gradient complete inside backward
        dense, plain = [p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]
        if cfg.overlap_optimizer:  # plain ones stepped inside backward, FSDP ones after it (optim.py)
            from .optim import SplitOverlappedAdamW

            self.optimizer = SplitOverlappedAdamW(plain, dense, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused)
            return
        groups = [g for g in (dense, plain) if g]
        self.optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused, foreach=not fused)

    # ------------------------------------------------------------ one step
    def _forward(self, batch: dict, num_items: Any) -> Any:
        docs = batch.get("doc_ids")
        ctx = self.masking.documents(docs) if self.masking is not None and docs is not None else nullcontext()
        with ctx:
            return self.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), shift_labels=batch["shift_labels"],
                              num_items_in_batch=num_items)

    def step(self) -> dict[str, Any]:
        from ..parallel.expert_parallel import expert_load

        cfg, cuda = self.cfg, self.device.type == "cuda"
        lr = lr_at(cfg, self.step_index)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        micro = [self.data.next_batch() for _ in range(cfg.grad_accum)]
        targets = sum(int((b["shift_labels"] != -100).sum()) for b in micro)
        num_items = torch.tensor(max(1, targets), device=self.device)
        clock = _Clock(cuda)
        loss_sum = torch.zeros((), device=self.device)
        aux = None
        for b in micro:
            clock.mark()
            out = self._forward(b, num_items)
            clock.mark("forward")
            out.loss.backward()
            clock.mark("backward")
            loss_sum += out.loss.detach().float()
            aux = out.aux_loss if out.aux_loss is not None else aux
        norm = clip_grads(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_router_bias()
        clock.mark("optimizer")
        # the stop vote: a signal handled after this read is not lost, it votes at the next step
        stats = torch.stack([loss_sum, torch.tensor(float(self.signalled is not None), device=self.device)])
        load = expert_load(self.model)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(stats)
            if load is not None:
                dist.all_reduce(load)
        phases = clock.finish()
        self.stop_requested = bool(stats[1].item() > 0)
        self.step_index += 1
        tokens = cfg.batch * cfg.seq * cfg.grad_accum
        m: dict[str, Any] = {"step": self.step_index, "loss": stats[0].item() / self.world, "lr": lr, "targets": targets,
                             "tokens_per_s": tokens * self.world / clock.total_s, "step_ms": clock.total_s * 1e3,
                             **{f"{k}_ms": v * 1e3 for k, v in phases.items()}}
        if norm is not None:
            m["grad_norm"] = norm.item()
        if aux is not None:
            m["aux_loss"] = aux.detach().float().item()
        if cuda:  # FLOP figures only where they mean something
            tps = tokens / clock.total_s
            tflops = self.flops_per_token * tps / 1e12
            m.update(tokens_per_s_per_gpu=tps, tflops_per_gpu=tflops, mfu=tflops / cfg.peak_tflops,
                     peak_mem_gib=torch.cuda.max_memory_allocated(self.device) / 2**30)
        else:
            m["peak_rss_gib"] = _rss_gib()
        if self.masking is not None and micro[0].get("doc_ids") is not None:
            m["doc_attention"] = self.masking.short()  # what the layers ran: "varlen", "sdpa-mask", ...
        if load is not None:
            lf = load.float()
            m["expert_load_max_over_mean"] = (lf.max(1).values / lf.mean(1).clamp_min(1e-9)).mean().item()
            m["expert_load_min_over_mean"] = (lf.min(1).values / lf.mean(1).clamp_min(1e-9)).mean().item()
        return m

    def _update_router_bias(self) -> None:
        if not self.cfg.router_bias_rate:
            return
        from ..models.common.router import SigmoidGroupRouter

        for mod in self.model.modules():
            if isinstance(mod, SigmoidGroupRouter):
                if dist.is_initialized() and self.world > 1:
                    dist.all_reduce(mod.expert_load)
                mod.update_bias(self.cfg.router_bias_rate)

    def evaluate(self) -> float:
        """Mean loss per target token over the whole `--eval-data` (every rank evaluates its share)."""

        self.model.eval()
        tot = torch.zeros(2, device=self.device)
        with torch.no_grad():
            for b in self.eval_data.eval_batches():
                out = self._forward(b, torch.tensor(1, device=self.device))  # a sum over the batch's targets
                tot += torch.stack([out.loss.detach().float(), (b["shift_labels"] != -100).sum().float()])
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(tot)
        self.model.train()
        return (tot[0] / tot[1].clamp_min(1)).item()

    # ------------------------------------------------------------ save
    def save(self, root: Path) -> Path:
        """`root/step-N` (model + train_state + trainer.json), atomically; collective. Prints where it went."""

        from ..convert.source import resolve_source
        from ..parallel import save_sharded

        final, staging = root / f"step-{self.step_index}", root / f".step-{self.step_index}.partial"
        if self.rank == 0:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        dist.barrier()
        if hasattr(self.optimizer, "finish"):
            self.optimizer.finish()
        save_sharded(self.export_state(), staging / "model", self.mesh, layout=self.cfg.save_layout, source=resolve_source(self.cfg.model, None))
        ckpt.save_train_state(staging / "train_state", self.model, self.optimizer, self.mesh.ep_root)
        dist.barrier()
        if self.rank == 0:
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging / "model")
            meta = {"step": self.step_index, "world": self.world, "ep": self.cfg.ep, "run_id": self.run_id, "model": self.cfg.model,
                    "data": self.data.state_dict(), "args": _jsonable(asdict(self.cfg))}
            (staging / "trainer.json").write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            ckpt.keep_last(root, self.cfg.keep_last)
            if not self.cfg.quiet:
                print(f"saved step-{self.step_index} to {final}", flush=True)
        dist.barrier()
        return final

    def export_state(self) -> dict:
        """The model as `save_sharded` takes it: the source checkpoint's names, experts as `Shard(0)` DTensors over the
        ep mesh (gathered only over the ranks holding the same experts), in the source's dtypes."""
        from ..convert.safetensors_io import torch_dtype

        specs = self.hf_source.specs
        experts = ckpt._expert_ids(self.model)
        out = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name not in specs:
                continue
            mod = experts.get(id(t))
            value = ckpt._global_expert(t.detach(), mod, self.mesh.ep_root) if mod is not None else t.detach()
            want = torch_dtype(specs[name].dtype)
            out[name] = value.to(want) if value.dtype != want else value
        return out

    # ------------------------------------------------------------ loop
    def run(self, on_step: Any = None) -> list[dict]:
        from .logs import Sinks

        cfg = self.cfg
        root = Path(cfg.save) if cfg.save else None
        sinks = Sinks(cfg, self.rank, self.step_index if self.resume_path else None, self.run_id)
        history: list[dict] = []
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
        t_start, first = time.perf_counter(), self.step_index
        try:
            while self.step_index < cfg.steps:
                m = self.step()
                if self.step_index == first + 1 and "doc_attention" in m and self.rank == 0 and not cfg.quiet:
                    print(f"packed documents kept apart by {self.masking.describe()}", flush=True)
                last = self.step_index == cfg.steps
                if self.eval_data is not None and (last or (cfg.eval_every and self.step_index % cfg.eval_every == 0)):
                    m["eval_loss"] = self.evaluate()
                done = self.step_index - first
                m["eta_s"] = (time.perf_counter() - t_start) / done * (cfg.steps - self.step_index)
                history.append(m)
                sinks.write(m, log=last or self.step_index % cfg.log_every == 0)
                if on_step is not None:
                    on_step(m)
                if self.stop_requested and self.rank == 0 and not cfg.quiet:
                    print(f"{self.signalled or 'a signal on another rank'}: stopping after step {self.step_index}"
                          + (" and saving" if cfg.save else ""), flush=True)
                if root is not None and (last or self.stop_requested or (cfg.save_every and self.step_index % cfg.save_every == 0)):
                    self.save(root)
                if self.stop_requested:
                    break
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            sinks.close()
        return history

    def _claim(self, root: Path) -> None:
        err = [None]
        if self.rank == 0:
            try:
                ckpt.claim_run_folder(root, self.run_id)
            except TrainError as e:
                err[0] = str(e)
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(err, src=0)
        if err[0]:
            raise TrainError(err[0])

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Record the signal (the ranks vote on stopping in `step()`); a second one stops at once. Nothing is printed
        here: a print inside a handler can interrupt the main thread's own print (a reentrant-write error)."""
        if self.signalled is not None:
            raise KeyboardInterrupt
        self.signalled = signal.Signals(signum).name


class _Clock:
    """Seconds per phase of a step (CUDA events on a GPU, wall clock on CPU), summed over micro-batches."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.t0, self.marks = cuda, time.perf_counter(), []
        self._event = (lambda: _recorded(torch.cuda.Event(enable_timing=True))) if cuda else time.perf_counter

    def mark(self, phase: str | None = None) -> None:
        self.marks.append((phase, self._event()))

    def finish(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        self.total_s = time.perf_counter() - self.t0
        out: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:]):
            if phase is not None:
                out[phase] = out.get(phase, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


def _recorded(ev: Any) -> Any:
    ev.record()
    return ev


def _main_thread() -> bool:

    return threading.current_thread() is threading.main_thread()


def _rss_gib() -> float:

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), dict, list)) and k != "extra"}

