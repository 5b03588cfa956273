"""`spawn_ranks`/`run_ranks`, the launcher of every multi-process test: results survive ranks that exit at once,
failures and hangs fail the test by rank instead of hanging it, and each call gets a rendezvous of its own."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from spawn_ranks import init_gloo, run_ranks, spawn_ranks


def _sum_ranks(rank: int, world: int, scale: float) -> dict:
    init_gloo()
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    return {"rank": rank, "sum": x * scale}  # the rank returns and exits at once: the parent reads the file later


def _raise_on_rank_1(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    time.sleep(20)  # rank 0 is still running when rank 1 fails: it gets killed, and rank 1's error is still the one shown


def _hang_on_rank_0(rank: int, world: int) -> None:
    if rank == 0:
        time.sleep(3600)


def test_results_come_back_in_rank_order():
    got = run_ranks(_sum_ranks, 3, 2.0)
    assert [g["rank"] for g in got] == [0, 1, 2]
    assert all(torch.equal(g["sum"], torch.tensor([12.0])) for g in got)  # (1 + 2 + 3) * 2


def test_back_to_back_calls_do_not_collide():
    for _ in range(3):
        assert [g["rank"] for g in run_ranks(_sum_ranks, 2, 1.0)] == [0, 1]


def test_a_raising_rank_fails_the_test_with_its_traceback():
    with pytest.raises(pytest.fail.Exception, match=r"(?s)rank 1 exited with 1.*planted failure on rank 1"):
        run_ranks(_raise_on_rank_1, 2)


def test_a_hung_rank_is_killed_at_the_deadline():
    with pytest.raises(pytest.fail.Exception, match=r"rank\(s\) \[0(, 1)?\] still running"):
        spawn_ranks(_hang_on_rank_0, 2, timeout_s=15)  # [0, 1] if rank 1 had not even started on a loaded machine
