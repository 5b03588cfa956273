"""Run a function on `world` spawned ranks and collect what each returned: the one way tests start processes.

Contract:
- Every call gets a rendezvous of its own: the parent hosts a `TCPStore` on a port the OS assigns (port 0, held
  for the whole call, so no other test or run can take it), and the ranks join it as clients
  (`TORCHELASTIC_USE_AGENT_STORE=True`, `env://`). Back-to-back or parallel runs never share a port.
- A rank's result travels as a file (`torch.save` to a temporary name, then an atomic rename), never through a
  multiprocessing queue: a rank may exit the moment it is done, and the parent reads the file afterwards.
- A rank that raises writes its traceback beside the results and exits 1; `run_ranks` then fails the test with
  that traceback. A rank still running at the deadline is killed and the test fails naming it. Nothing hangs.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300.0


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        tmp = Path(out) / f".r{rank}.pt.tmp"
        torch.save(result, tmp)
        tmp.rename(Path(out) / f"r{rank}.pt")
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent as text
        (Path(out) / f"r{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(code)  # skip interpreter teardown: nothing is left for it to flush


def init_gloo(timeout_s: float = 120.0) -> None:
    """Join the call's rendezvous with gloo (inside a rank started by `run_ranks`)."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


@dataclass(frozen=True)
class RankOutcome:
    """How one rank ended: its exit code, its return value (exit 0) or its traceback (an exception)."""

    exitcode: int
    result: Any = None
    error: str | None = None


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S, stop_on_failure: bool = False) -> list[RankOutcome]:
    """`fn(rank, world, *args)` on `world` spawned ranks; how each ended, in rank order.

    `fn` must be importable (a module-level function). It may call `init_gloo()` or anything that reads the
    `env://` variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Waits for every rank to exit (or, with
    `stop_on_failure`, for the first failure, then kills the rest); fails the test at the deadline, never hangs.
    """
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="ranks-") as out:
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world, store.port, out, args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        try:
            _wait(procs, time.monotonic() + timeout_s, stop_on_failure)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
            del store
        return [_outcome(Path(out), r, p.exitcode) for r, p in enumerate(procs)]


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """`spawn_ranks` where every rank must succeed: each rank's return value, or the test fails with the first error."""
    outcomes = spawn_ranks(fn, world, *args, timeout_s=timeout_s, stop_on_failure=True)
    failed = [(r, o) for r, o in enumerate(outcomes) if o.exitcode != 0]
    if failed:
        # the rank that raised is the news; ranks still running when it failed were killed (-9) by `spawn_ranks`
        r, o = next(((r, o) for r, o in failed if o.error), failed[0])
        others = ", ".join(f"rank {q}: {p.exitcode}" for q, p in failed if q != r)
        pytest.fail(f"rank {r} exited with {o.exitcode}:\n{o.error or 'no traceback (killed or crashed)'}" + (f"\n(also {others})" if others else ""))
    return [o.result for o in outcomes]


def _outcome(out: Path, rank: int, exitcode: int) -> RankOutcome:
    res, err = out / f"r{rank}.pt", out / f"r{rank}.err"
    if exitcode == 0 and res.exists():
        return RankOutcome(0, torch.load(res, weights_only=True))
    return RankOutcome(exitcode if exitcode != 0 else -1, error=err.read_text() if err.exists() else None)


def _wait(procs: list, deadline: float, stop_on_failure: bool) -> None:
    while any(p.is_alive() for p in procs):
        if stop_on_failure and any(not p.is_alive() and p.exitcode != 0 for p in procs):
            return
        if time.monotonic() > deadline:
            stuck = [r for r, p in enumerate(procs) if p.is_alive()]
            pytest.fail(f"rank(s) {stuck} still running at the deadline (killed)")
        time.sleep(0.05)
