"""Ctrl-C (SIGINT) and SIGTERM on ``qbench run --executor dask``: the cell training on a
Dask worker (another process, in a worker thread, where no signal arrives) stops, its last
epoch checkpoint stays, its MLflow run is marked KILLED, the command exits non-zero, and
the next run resumes the same run; SIGTERM on the worker itself (a preemption) does the
same and Dask runs the cell again elsewhere. (The local executor's own signal tests are in
test_reliability.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import sigint_as_a_terminal_sends_it

pytest.importorskip("distributed")

SUITES = Path(__file__).parent / "suites"


def runs_of(out: Path):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def wait_for_epoch(proc: subprocess.Popen, out: Path, epoch: int = 1) -> int:
    """Block until the cell has checkpointed ``epoch`` (or a later one); returns it."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        for f in (out / "cells").glob("*/stage_train.pt") if (out / "cells").exists() else []:
            try:
                done = int(torch.load(f, weights_only=True)["history"]["epoch"])
            except (FileNotFoundError, RuntimeError, EOFError):
                continue
            if done >= epoch:
                return done
        time.sleep(0.1)
    raise AssertionError(f"the cell never checkpointed epoch {epoch}: {proc.communicate()[0][-3000:]}")


def test_interrupt_reaches_a_cell_running_in_another_thread():
    """The mechanism itself: a registered thread gets KeyboardInterrupt, others do not."""
    from qbench.harness import signals

    seen: dict[str, str] = {}
    started = threading.Semaphore(0)

    def cell(token: str) -> None:
        with signals.interruptible(token):
            try:
                started.release()
                for _ in range(100):  # a Python loop, as a training loop is between kernels
                    time.sleep(0.01)
                seen[token] = "finished"
            except KeyboardInterrupt:
                seen[token] = "interrupted"

    threads = [threading.Thread(target=cell, args=(t,)) for t in ("mine", "other suite's")]
    for t in threads:
        t.start()
    for _ in threads:
        started.acquire()
    assert signals.interrupt("mine") == 1
    assert signals.wait_stopped("mine", timeout=5)
    assert signals.running() == 1, "the other suite's cell goes on"
    for t in threads:
        t.join()
    assert seen == {"mine": "interrupted", "other suite's": "finished"}


def start(out: Path, *extra: str) -> subprocess.Popen:
    """``qbench run`` on the signal suite (one cell of 12 epochs) with a local Dask cluster."""
    return subprocess.Popen(
        [sys.executable, "-m", "qbench.harness.cli", "run", str(SUITES / "signal.yaml"), "--out", str(out)]
        + ["--no-leaderboard", "--executor", "dask", "--workers", "1", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_a_terminal_sends_it,
    )


def interrupt(proc: subprocess.Popen, out: Path, sig: int, after: int):
    """Send ``sig`` to ``qbench run`` once its cell has checkpointed an epoch past ``after``;
    check that it exits 130 with the run KILLED; returns (run, checkpointed epoch, output)."""
    wait_for_epoch(proc, out, after + 1)
    t0 = time.monotonic()
    proc.send_signal(sig)
    text, _ = proc.communicate(timeout=90)
    assert time.monotonic() - t0 < 45, "exits promptly"
    assert proc.returncode == 130 and "resume" in text, text[-3000:]
    (run,) = runs_of(out)
    assert run.info.status == "KILLED" and run.data.tags["qbench.status"] == "killed", run.data.tags
    assert "interrupted" in run.data.tags["qbench.error"]
    epoch = int(torch.load(next((out / "cells").glob("*/stage_train.pt")), weights_only=True)["history"]["epoch"])
    assert after < epoch < 12, "the last epoch checkpoint stays"
    return run, epoch, text


@pytest.mark.slow
def test_sigint_sigterm_and_a_preempted_worker_each_resume_the_one_run(tmp_path):
    # 1. Ctrl-C on qbench run: the cell on the worker stops, its run is KILLED
    first, at, _ = interrupt(start(tmp_path), tmp_path, signal.SIGINT, 0)
    # 2. the rerun resumes that run; SIGTERM on qbench run stops it again, later
    second, at, text = interrupt(start(tmp_path), tmp_path, signal.SIGTERM, at)
    assert second.info.run_id == first.info.run_id, "the same run, resumed"
    assert "epoch 1/12 " not in text, "resumed from the checkpoint, not from epoch 1"
    # 3. the next rerun resumes it again; its worker is preempted (SIGTERM to the worker
    #    process, as Slurm does): the run is marked KILLED, Dask runs the cell on a new
    #    worker, which resumes the same run to the end
    proc = start(tmp_path)
    wait_for_epoch(proc, tmp_path, at + 1)
    (run,) = runs_of(tmp_path)
    pid = int(run.data.tags["qbench.pid"])
    assert pid != proc.pid and run.data.tags["qbench.host"] == socket.gethostname()
    os.kill(pid, signal.SIGTERM)  # the worker process (a child of the nanny in qbench run)
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, text[-3000:]
    assert text.count("[1/1] digits/small_cnn fp32") == 2, "started twice: once per worker"
    (last,) = runs_of(tmp_path)
    assert last.info.run_id == first.info.run_id and last.info.status == "FINISHED"
    assert last.data.tags["qbench.status"] == "done" and int(last.data.tags["qbench.pid"]) != pid
    history = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        last.info.run_id, "test_top1"
    )
    steps = [m.step for m in history]
    # one curve over the four attempts: each resumed (an epoch cut short may be logged twice)
    assert set(steps) == set(range(1, 13)) and len(steps) <= 12 + 3, steps
