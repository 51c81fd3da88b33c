"""GPU worker processes share the machine's CPU cores instead of each taking all of them."""

from __future__ import annotations

import os

from qbench.harness.executor import worker_threads


def test_each_worker_gets_an_equal_share_of_the_cores(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert worker_threads(4) == 16
    assert worker_threads(6) == 10
    assert worker_threads(128) == 1  # never zero


def test_omp_num_threads_wins(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(4) == 3
