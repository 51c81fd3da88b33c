"""The local executor on several devices: one worker process per device, kept from cell to
cell, and a worker killed mid-cell (SIGKILL) costs only its cell, which the next run
resumes from its last epoch checkpoint. Two CPU "devices" stand in for two GPUs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from qbench.harness.executor import LocalExecutor
from qbench.harness.progress import Reporter
from qbench.harness.runner import RunContext
from qbench.harness.suite import load_suite
from qbench.harness.tracking import default_uri

pytestmark = pytest.mark.slow

SUITE = Path(__file__).parent / "suites" / "pool_digits.yaml"  # 12 cells; LSQ W4A4 trains 40 epochs


class KillMidCell(Reporter):
    """Kills the worker training an LSQ W4A4 cell once it has checkpointed two epochs."""

    def __init__(self, total: int, uri: str):
        super().__init__(total, plain=True)
        self.client = MlflowClient(uri)
        self.victim = None

    def event(self, kind: str, **kw) -> None:
        super().event(kind, **kw)
        if self.victim or kind != "epoch" or kw["total"] != 40 or kw["epoch"] < 2:
            return
        exp = self.client.get_experiment_by_name("pool_digits")
        query = "tags.`qbench.w_bits` = '4' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([exp.experiment_id], query):
            self.victim = run
            os.kill(int(run.data.tags["qbench.pid"]), signal.SIGKILL)
            return


def _run(out: Path, reporter_cls=None):
    suite = load_suite(SUITE)
    uri = default_uri(out)
    ctx = RunContext(out_dir=out, tracking_uri=uri)
    reporter = reporter_cls(len(suite.cells), uri) if reporter_cls else Reporter(len(suite.cells), plain=True)
    return suite.cells, LocalExecutor(["cpu", "cpu"]).run(suite.cells, ctx, reporter), reporter


def test_workers_are_kept_and_a_killed_one_costs_only_its_cell(tmp_path: Path) -> None:
    cells, results, reporter = _run(tmp_path, KillMidCell)
    victim = reporter.victim
    assert victim is not None, "no LSQ W4A4 cell was seen mid-way"
    failed = [r for r in results if r.status == "failed"]
    assert [r.cell_id for r in failed] == [victim.data.tags["qbench.cell_id"]]
    assert failed[0].error == "worker exited with code -9"
    assert all(r.status == "done" for r in results if r not in failed), [r.error for r in results]

    mlflow.set_tracking_uri(default_uri(tmp_path))
    runs = mlflow.search_runs(search_all_experiments=True)
    pids = set(runs["tags.qbench.pid"])
    # two workers for twelve cells, and one more for the device whose worker was killed
    assert len(pids) <= 3 and str(os.getpid()) not in pids, pids

    # the next run resumes the killed cell from its checkpoint and runs nothing else
    cells, results, _ = _run(tmp_path)
    assert all(r.status in ("done", "skipped") for r in results), [r.error for r in results]
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 12 and set(runs["tags.qbench.cell_id"]) == {c.id for c in cells}, "one run per cell"
    assert set(runs["status"]) == {"FINISHED"}
    resumed = MlflowClient(default_uri(tmp_path)).get_metric_history(victim.info.run_id, "test_top1")
    steps = sorted(m.step for m in resumed)
    assert steps == list(range(1, 41)), f"one curve over the 40 epochs, each once: {steps}"
