"""``qbench run --executor dask`` on a real cluster: a scheduler and two worker processes
started by hand (``dask scheduler`` / ``dask worker``), runs recorded by a real MLflow server
(``qbench server``). Every cell finishes once, with exactly one run, even though a worker is
killed mid-cell: its cell runs again on the other worker and resumes the same run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

pytest.importorskip("distributed")

SUITES = Path(__file__).parent / "suites"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, timeout: float = 90.0, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: {p.args[:3]} exited with {p.returncode}: {p.stdout.read()[-2000:]}")
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def server_up(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2):
            return True
    except OSError:
        return False


def start(*argv: str) -> subprocess.Popen:
    # its own process group, so that a test ends the whole of it (mlflow server's workers too)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    """End each process group we started, at once (a graceful shutdown is not under test)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """An MLflow server, a Dask scheduler and two Dask workers (no nanny: a killed worker
    stays dead), each a process of its own. Yields (scheduler address, tracking URI, worker pids)."""
    d = tmp_path_factory.mktemp("cluster")
    port = free_port()
    procs = [
        start(
            str(BIN / "qbench"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{d / 'server.db'}", "--artifacts-destination", str(d / "artifacts"),
        ),
        start(
            str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
            "--scheduler-file", str(d / "scheduler.json"),
        ),
    ]  # fmt: skip
    try:
        addr = wait_until(
            lambda: (d / "scheduler.json").exists() and json.loads((d / "scheduler.json").read_text())["address"],
            "the scheduler",
            procs=procs[1:],
        )
        workers = [
            start(
                str(BIN / "dask"), "worker", addr, "--nthreads", "1", "--no-nanny", "--name", f"w{i}",
                "--no-dashboard", "--preload", "qbench.harness.runner", "--preload", "mlflow",  # load while we wait
            )
            for i in range(2)
        ]  # fmt: skip
        procs += workers
        uri = f"http://127.0.0.1:{port}"
        wait_until(lambda: server_up(uri), "the MLflow server", procs=procs[:1])
        from distributed import Client

        with Client(addr, timeout="30s") as c:
            c.wait_for_workers(2, timeout=90)
        yield addr, uri, {p.pid: p for p in workers}
    finally:
        stop(procs)
    out = procs[0].stdout.read()
    assert f"use --tracking-uri http://127.0.0.1:{port}" in out, out[-2000:]


def runs_of(uri: str, suite: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(suite)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def qbench_run_here(suite: Path, out: Path, addr: str, uri: str):
    """The same command line, in this process (no second start-up of torch and MLflow)."""
    from qbench.harness.cli import cli

    args = ["run", str(suite), "--out", str(out), "--no-leaderboard", "--executor", "dask"]
    return CliRunner().invoke(cli, args + ["--scheduler", addr, "--tracking-uri", uri])


@pytest.mark.slow
def test_a_suite_runs_once_per_cell_even_when_a_worker_dies(cluster, tmp_path):
    addr, uri, workers = cluster
    client = MlflowClient(uri)
    done: dict = {}
    suite = SUITES / "dask_digits.yaml"
    running = threading.Thread(target=lambda: done.update(res=qbench_run_here(suite, tmp_path, addr, uri)))
    running.start()

    def lsq_mid_cell():
        """The run of an LSQ W4A4 cell (8 epochs) that has checkpointed an epoch and still runs."""
        exp = client.get_experiment_by_name("dask_digits")
        for state in (tmp_path / "cells").glob("*/stage_train.pt") if exp else []:
            found = client.search_runs([exp.experiment_id], f"tags.`qbench.cell_id` = '{state.parent.name}'")
            if found and found[0].data.tags["qbench.w_bits"] == "4" and found[0].info.status == "RUNNING":
                return found[0]
        assert running.is_alive(), done["res"].output[-3000:]
        return None

    victim = wait_until(lsq_mid_cell, "an LSQ cell mid-way", timeout=150)
    pid = int(victim.data.tags["qbench.pid"])
    assert pid in workers, "the run names the worker process training it"
    os.kill(pid, signal.SIGKILL)
    running.join(300)
    res = done["res"]
    assert res.exit_code == 0, res.output[-4000:]

    runs = runs_of(uri, "dask_digits")
    cells = [r.data.tags["qbench.cell_id"] for r in runs]
    assert len(cells) == 12 and len(set(cells)) == 12, "exactly one run per cell"
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["qbench.status"] for r in runs} == {"done"}
    resumed = next(r for r in runs if r.info.run_id == victim.info.run_id)
    assert int(resumed.data.tags["qbench.pid"]) in set(workers) - {pid}, "the other worker finished it"
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "test_top1")]
    assert set(steps) == set(range(1, 9)), "one curve over all 8 epochs across the two workers"
    # the artifacts went through the server, so any machine can read a parent's checkpoint
    assert resumed.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [a.path for a in client.list_artifacts(resumed.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]

    # a rerun sends nothing to the cluster: every cell is already finished
    again = qbench_run_here(suite, tmp_path, addr, uri)
    assert again.exit_code == 0 and again.output.count("skipped: ") == 12, again.output[-3000:]
    assert len(runs_of(uri, "dask_digits")) == 12


def test_executor_options_are_checked_before_anything_runs(tmp_path):
    from qbench.harness.cli import cli

    suite = str(SUITES / "dask_digits.yaml")
    cases = {
        ("--scheduler", "tcp://127.0.0.1:1"): "--scheduler needs --executor dask",
        ("--workers", "2"): "--workers is for --executor dask",
        ("--executor", "dask", "--device", "cpu"): "--device is for the local executor",
        ("--executor", "dask", "--scheduler", "127.0.0.1:1", "--workers", "2"): "leave it out with --scheduler",
    }
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        cases[("--executor", "slurm")] = "needs dask-jobqueue"
    for args, message in cases.items():
        res = CliRunner().invoke(cli, ["run", suite, "--out", str(tmp_path / "out"), *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists(), "nothing was written"


def test_an_unreachable_scheduler_is_one_line(tmp_path, monkeypatch):
    from qbench.harness import dask_executor
    from qbench.harness.cli import cli

    monkeypatch.setattr(dask_executor, "CONNECT_S", 1.0)

    res = CliRunner().invoke(
        cli,
        ["run", str(SUITES / "dask_digits.yaml"), "--out", str(tmp_path), "--executor", "dask"]
        + ["--scheduler", f"tcp://127.0.0.1:{free_port()}", "--no-leaderboard"],
    )
    assert res.exit_code == 2 and "cannot reach the Dask scheduler" in res.output, res.output
    assert not (tmp_path / "mlflow.db").exists(), "no store was created"
