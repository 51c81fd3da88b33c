"""The store keeps every result exactly once: Ctrl-C and SIGTERM checkpoint and resume,
``--force`` keeps the old result until its replacement finished, finishing is idempotent,
and a second ``qbench run`` on the same output folder is refused."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import sigint_as_a_terminal_sends_it

SUITES = Path(__file__).parent / "suites"


def qbench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qbench.harness.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def runs_of(out: Path):
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True)


def _start(out: Path, *extra: str, suite: Path = SUITES / "long.yaml") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qbench.harness.cli", "run", str(suite), "--out", str(out)]
        + ["--no-leaderboard", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_a_terminal_sends_it,
    )


def _wait_for_lsq_epoch(proc: subprocess.Popen, out: Path, epoch: int = 3) -> int:
    """Block until the LSQ cell (the one with 40 epochs) has checkpointed ``epoch``."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for f in (out / "cells").glob("*/stage_train.pt") if (out / "cells").exists() else []:
            try:
                state = torch.load(f, weights_only=True)
            except (FileNotFoundError, RuntimeError, EOFError):
                continue
            if state["history"]["epoch"] >= epoch and "step" in str(state["model"].keys()):
                return int(state["history"]["epoch"])
        time.sleep(0.2)
    raise AssertionError("the LSQ cell never reached its epoch " + str(epoch))


@pytest.mark.parametrize(
    ("sig", "devices"),
    [(signal.SIGINT, "cpu"), (signal.SIGTERM, "cpu"), (signal.SIGTERM, "cpu,cpu")],
    ids=["SIGINT", "SIGTERM", "SIGTERM-worker-pool"],
)
def test_interrupt_checkpoints_marks_killed_and_resumes(tmp_path, sig, devices):
    """In this process, or (``cpu,cpu``) in a pool worker, which the interrupted parent stops."""
    proc = _start(tmp_path, "--device", devices)
    at = _wait_for_lsq_epoch(proc, tmp_path)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30, "exits promptly"
    assert proc.returncode == 130 and "resume" in err
    df = runs_of(tmp_path)
    lsq = df[df["tags.qbench.method"] == "lsq"].iloc[0]
    assert lsq["tags.qbench.status"] == "killed" and lsq["status"] == "KILLED"
    res = qbench("run", str(SUITES / "long.yaml"), "--out", str(tmp_path), "--no-leaderboard")
    assert res.returncode == 0, res.stderr
    epochs = [x for x in res.stdout.splitlines() if x.strip().startswith("epoch ")]
    assert len(epochs) <= 40 - at + 1, "resumed from the checkpoint, not from epoch 1"
    df = runs_of(tmp_path)
    assert len(df) == 2 and set(df["tags.qbench.status"]) == {"done"}
    lsq2 = df[df["tags.qbench.method"] == "lsq"].iloc[0]
    assert lsq2["run_id"] == lsq["run_id"], "the same run, resumed"
    steps = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(lsq2["run_id"], "test_top1")}
    assert steps == set(range(1, 41))


def test_force_keeps_the_old_result_until_the_new_one_finished(tmp_path):
    res = qbench("run", str(SUITES / "long.yaml"), "--out", str(tmp_path), "--no-leaderboard")
    assert res.returncode == 0, res.stderr
    before = runs_of(tmp_path).set_index("tags.qbench.method")
    proc = _start(tmp_path, "--force")
    _wait_for_lsq_epoch(proc, tmp_path)
    proc.kill()
    proc.wait()
    res = qbench("show", str(SUITES / "long.yaml"), "--out", str(tmp_path))
    assert res.stdout.count(" done ") == 2, "both results survive a killed --force"
    res = qbench("run", str(SUITES / "long.yaml"), "--out", str(tmp_path), "--no-leaderboard")
    assert res.returncode == 0 and res.stdout.count("skipped:") == 2
    done = runs_of(tmp_path)
    done = done[done["tags.qbench.status"] == "done"].set_index("tags.qbench.method")
    assert done.loc["lsq", "run_id"] == before.loc["lsq", "run_id"]


def test_a_crash_after_recording_finishes_without_retraining(tmp_path):
    from qbench.harness.tracking import STATUS, Tracker, default_uri

    res = qbench("run", str(SUITES / "tiny.yaml"), "--out", str(tmp_path), "--no-leaderboard")
    assert res.returncode == 0, res.stderr
    tracker = Tracker(default_uri(tmp_path))
    lsq = next(r for r in tracker.runs().values() if r.tags["qbench.method"] == "lsq")
    # as if the process died between logging the results and marking the run finished
    tracker.set_tags(lsq.run_id, {STATUS: "running"})
    tracker.client.update_run(lsq.run_id, status="RUNNING")
    res = qbench("run", str(SUITES / "tiny.yaml"), "--out", str(tmp_path), "--no-leaderboard")
    assert res.returncode == 0, res.stderr
    assert not [x for x in res.stdout.splitlines() if x.strip().startswith("epoch ")], "nothing retrained"
    again = Tracker(default_uri(tmp_path)).runs()[lsq.cell_id]
    assert again.run_id == lsq.run_id and again.status == "done"
    history = tracker.client.get_metric_history(lsq.run_id, "test_top1")
    assert [m.step for m in history] == [1, 2], "one curve, not two"


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    endless = tmp_path / "endless.yaml"
    endless.write_text((SUITES / "long.yaml").read_text().replace("epochs: 40", "epochs: 5000"))
    proc = _start(tmp_path, suite=endless)
    _wait_for_lsq_epoch(proc, tmp_path, epoch=1)
    res = qbench("run", str(endless), "--out", str(tmp_path), "--no-leaderboard")
    proc.kill()
    proc.wait()
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "another qbench run" in lines[0] and str(tmp_path) in lines[0]
    df = runs_of(tmp_path)
    assert len(df) == 2, "one run per cell: the second process trained nothing"
