"""Communication figures of a torch-profiler run (used by `train_bench.py --profile`).

Contract: `comm_exposure(trace_path, steps)` reads a chrome trace and returns, per step in ms, the GPU time spent in
communication kernels (NCCL, DeepEP) and the part of it during which no compute kernel ran on any stream (exposed),
also per kind of collective, and the GPU's idle time (no kernel on any stream between the first kernel and the last:
the host was behind, e.g. after a host sync). `profile_steps(kind, gate, step_fn, device, path)` profiles two calls of `step_fn`,
appends a kernel table to `path` and returns `comm_exposure` of them (CUDA only). Unit-tested on a hand-made trace
(tests/test_bench_smoke.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMM_KERNELS = ("nccl", "deep_ep", "intranode", "notify_dispatch", "cached_notify")


def _union_ms(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


COMM_KINDS = {"reduce_scatter": ("reducescatter",), "all_gather": ("allgather",), "all_reduce": ("allreduce",),
              "all_to_all": ("sendrecv", "alltoall"), "deepep": ("deep_ep",)}


def _overlap_ms(spans: list[tuple[float, float]], other: list[tuple[float, float]]) -> float:
    """Time (same unit) that the disjoint sorted `spans` share with the disjoint sorted `other`."""
    total, j = 0.0, 0
    for a, b in spans:
        while j < len(other) and other[j][1] <= a:
            j += 1
        k = j
        while k < len(other) and other[k][0] < b:
            total += min(b, other[k][1]) - max(a, other[k][0])
            k += 1
    return total


def comm_exposure(trace_path: str, steps: int) -> dict[str, float]:
    """From a chrome trace: GPU time per step in communication kernels (NCCL, DeepEP) and the part of it during which
    no compute kernel ran on any stream (exposed), in ms; also the exposed time of each kind of collective."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    comm: dict[str, list] = {k: [] for k in COMM_KINDS}
    compute = []
    for e in events:
        if e.get("cat") != "kernel" or "dur" not in e:
            continue
        span, name = (float(e["ts"]), float(e["ts"]) + float(e["dur"])), e["name"].lower()
        kind = next((k for k, keys in COMM_KINDS.items() if any(x in name for x in keys)), None)
        if kind is None and any(x in name for x in COMM_KERNELS):
            kind = "deepep" if "nccl" not in name else "all_to_all"
        (comm[kind] if kind else compute).append(span)
    comp_u = _union_ms(compute)
    all_u = _union_ms([s for spans in comm.values() for s in spans])
    total = sum(b - a for a, b in all_u)
    out = {"comm_ms": round(total / 1e3 / steps, 2), "exposed_comm_ms": round((total - _overlap_ms(all_u, comp_u)) / 1e3 / steps, 2)}
    busy = _union_ms(comp_u + all_u)
    if busy:  # between the first kernel and the last: no kernel on any stream (the host was behind, or waiting)
        out["gpu_idle_ms"] = round((busy[-1][1] - busy[0][0] - sum(b - a for a, b in busy)) / 1e3 / steps, 2)
    for kind, spans in comm.items():
        u = _union_ms(spans)
        if u:
            out[f"exposed_{kind}_ms"] = round((sum(b - a for a, b in u) - _overlap_ms(u, comp_u)) / 1e3 / steps, 2)
    return out


def profile_steps(kind: str, gate: str, step_fn, device: torch.device, path: str) -> dict[str, float]:  # noqa: ANN001
    """Two profiled steps: a kernel table appended to `path`, and (CUDA) the communication time and its exposed part."""
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step_fn()
    exposure: dict[str, float] = {}
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            exposure = comm_exposure(trace, 2)
    table = None
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()
    for key in (*keys, "self_cpu_time_total"):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=40)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    with open(path, "a") as f:
        f.write(f"\n===== {kind} gate={gate} (2 steps, top kernels by device time) {exposure} =====\n{table}\n")
        f.write(f"\n===== {kind} gate={gate} (the same 2 steps, top by host time) =====\n{cpu_table}\n")
    return exposure
