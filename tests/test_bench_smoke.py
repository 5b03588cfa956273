"""`bench/train_bench.py` on CPU with tiny shapes: every run kind the GPU records use still runs end to end.

The figures are meaningless on CPU; the test checks that each run reports its timings and memory fields (and no
error), so a broken run kind is found here rather than in a GPU session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ["transformers", "ours", "ours_overlap", "ours_defer", "transformers_defer", "trainer", "trainer_overlap"]


def test_train_bench_runs_every_kind_on_cpu() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "train_bench.py"), "--device", "cpu", "--tiny", "--layers", "2", "--seq", "16",
           "--steps", "1", "--warmup", "1", "--dtype", "float32", "--runs", ",".join(RUNS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"impl"')]
    assert [r["impl"].replace("(ep=1,world=1)", "").replace("+overlap", "_overlap") for r in rows] == RUNS, proc.stdout[-2000:]
    for r in rows:
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["tps"] > 0 and r["params_b"] > 0, r
        if not r["impl"].startswith("trainer"):
            assert r["step_loop_ms"] > 0 and r["gib_left_by_earlier_runs"] is None, r


def test_comm_exposure_counts_only_communication_no_compute_overlaps(tmp_path) -> None:
    """The exposed-communication figure of the EP profiles, on a hand-made trace: each kernel's span against the
    union of compute kernels on any stream (CPU ops ignored)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_bench

    kernels = [("ncclDevKernel_ReduceScatter_Sum_f32", 0, 100), ("sm90_gemm", 50, 100), ("void deep_ep::intranode::dispatch<2>", 200, 30),
               ("ncclDevKernel_AllGather_RING_LL", 300, 40), ("elementwise", 320, 100)]
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in kernels] + [{"cat": "cpu_op", "name": "nccl:all_gather", "ts": 0, "dur": 999}]
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": events}))
    got = train_bench.comm_exposure(str(tmp_path / "t.json"), steps=1)  # microseconds in, ms out
    # RS 0-100 overlaps the GEMM 50-100: 50 exposed; DeepEP 30 exposed; AG 300-340 overlaps 320-340: 20 exposed
    assert got == {"comm_ms": 0.17, "exposed_comm_ms": 0.1, "exposed_reduce_scatter_ms": 0.05, "exposed_all_gather_ms": 0.02, "exposed_deepep_ms": 0.03,
                   "gpu_idle_ms": 0.12}  # no kernel in 150-200 and 230-300


def test_host_overhead_runs_every_component_on_cpu() -> None:
    """`bench/host_overhead.py` (host time per decoder-layer component) with its A/B of the fused q/k kernel, and its
    op listing: every component reports both variants with positive times."""
    script = str(ROOT / "bench" / "host_overhead.py")
    base = [sys.executable, script, "--device", "cpu", "--tiny"]
    proc = subprocess.run([*base, "--seq", "32", "--small-seq", "16", "--iters", "1", "--repeat", "1", "--warmup", "1", "--ab-qk"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"component"')]
    names = {r["component"] for r in rows}
    for component in ("layer", "rms_norm", "attention", "router", "experts", "moe_block"):
        assert {f"{component} fused-qk", f"{component} unfused-qk"} <= names, names
    assert all(r["host_us"] > 0 and r["real_host_us"] > 0 for r in rows), rows
    ops = subprocess.run([*base, "--small-seq", "16", "--ops"], capture_output=True, text=True, timeout=600)
    assert ops.returncode == 0, ops.stderr[-2000:]
    listed = [line for line in ops.stdout.splitlines() if line.split(":")[0] in ("attention", "moe_block", "rms_norm")]
    assert len(listed) == 3 and all(" aten ops: " in line for line in listed), ops.stdout[-2000:]
