"""``recipe: {gpus: N}``: one cell trained by N processes with DistributedDataParallel, here
with gloo on the CPU. The 2-process cell learns what the 1-process cell learns (within the
seeds' spread), every method ends with bit-identical copies in both processes, a killed
cell resumes from its last epoch, only the first process records, and a cell given fewer
devices than it asks for fails with one line naming the recipe key."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import run_suite
from qbench.harness.ddp import DDPError, ddp_images_per_second, differing, launch
from qbench.harness.executor import LocalExecutor
from qbench.harness.progress import Reporter
from qbench.harness.runner import RunContext
from qbench.harness.suite import load_suite
from qbench.harness.tracking import default_uri

pytestmark = pytest.mark.slow

HEAD = """name: {name}
defaults:
  seeds: {seeds}
  recipe: {{batch_size: 64, lr: 0.05, nesterov: true, calib_batches: 1}}
experiments:
  - dataset: digits
    model: small_cnn
    model_options: {{width: 8}}
"""


def write_suite(tmp_path: Path, name: str, body: str, seeds: str = "[0]") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(HEAD.format(name=name, seeds=seeds) + body)
    return path


def run_here(path: Path, out: Path, devices: list[str] | None = None):
    """The suite through the local executor in this process (its DDP cells start their own)."""
    suite = load_suite(path)
    ctx = RunContext(out_dir=out, tracking_uri=default_uri(out))
    return suite.cells, LocalExecutor(devices or ["cpu"]).run(suite.cells, ctx, Reporter(len(suite.cells)))


def runs_of(out: Path):
    mlflow.set_tracking_uri(default_uri(out))
    return mlflow.search_runs(search_all_experiments=True)


# -- the acceptance: 2 processes learn what 1 learns -----------------------------------------

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """The same full-precision cells (3 seeds, 4 epochs), on 1 process and on 2 (gloo),
    through ``qbench run`` as a user types it."""
    tmp = tmp_path_factory.mktemp("pair")
    body = """    baseline: {recipe: {epochs: 4}}
    methods:
      - {method: fp32, bits: [W32A32], recipe: {epochs: 4, gpus: 2}}
"""
    out = tmp / "out"
    run_suite(write_suite(tmp, "pair", body, str(SEEDS)), out)
    return out


def test_two_processes_match_one_within_the_seeds_spread(pair) -> None:
    df = runs_of(pair)
    assert len(df) == 6 and set(df["tags.qbench.status"]) == {"done"}
    ddp = df["params.recipe.gpus"].fillna("1").astype(int) == 2  # gpus: 1 is left out of the identity
    one = dict(zip(df[~ddp]["tags.qbench.seed"], df[~ddp]["metrics.top1"], strict=True))
    two = dict(zip(df[ddp]["tags.qbench.seed"], df[ddp]["metrics.top1"], strict=True))
    assert sorted(one) == sorted(two) == [str(s) for s in SEEDS]
    # the spread the seed alone causes on one process; the 2-process cells see the same global
    # batches (only BatchNorm's statistics are per process), so their mean stays within it
    spread = max(one.values()) - min(one.values())
    assert spread > 0
    assert abs(statistics.mean(two.values()) - statistics.mean(one.values())) <= spread, (one, two)
    assert min(two.values()) > 60, "the 2-process cells learned"
    assert set(df[ddp]["tags.qbench.ddp"]) == {"2 processes (gloo), final states identical"}


def test_only_the_first_process_records(pair) -> None:
    df = runs_of(pair)
    ddp = df[df["params.recipe.gpus"].fillna("1").astype(int) == 2]
    assert len(ddp) == len(SEEDS), "one run per cell, not one per process"
    client = mlflow.tracking.MlflowClient(default_uri(pair))
    for run_id in ddp["run_id"]:
        for key in ("test_top1", "train_loss", "lr"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4], key
        assert len(client.get_metric_history(run_id, "top1")) == 1
        assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} == {"checkpoint/model.pt"}
    cells = pair / "cells"
    assert all([p.name for p in d.iterdir()] == ["model.pt"] for d in cells.iterdir()), "state cleared, once"


# -- every method keeps its copies equal -------------------------------------------------------

ADAM = {"optimizer": "adam", "lr": 1.0e-3, "weight_decay": 0.0}
METHODS = {
    "fp32": {"method": "fp32", "bits": ["W32A32"]},
    "uniform": {"method": "uniform", "bits": ["W8A8"]},
    "lsq": {"method": "lsq", "bits": ["W4A4"], "recipe": {"lr": 0.01}},
    # no calibration: LSQ's step sizes initialise on each process's own slice of the first batch
    "lsq_lazy": {"method": "lsq", "bits": ["W4A4"], "recipe": {"lr": 0.01, "calib_batches": 0}},
    "dorefa": {"method": "dorefa", "bits": ["W4A4"]},
    "pact": {"method": "pact", "bits": ["W4A4"]},
    "lqnet": {"method": "lqnet", "bits": ["W2A2"]},
    "apot": {"method": "apot", "bits": ["W4A4"]},
}
#: the other registered methods, with options like their own tiny suites' (Bi-Real needs its
#: own model: not here)
GATES = {f"gamma_{b}_init": 3.0 for b in (4, 8, 16, 32)}
MORE = {
    "apot_uniform": {"method": "apot_uniform", "bits": ["W4A4"]},
    "xnor": {"method": "xnor", "bits": ["W1A1"], "recipe": ADAM},
    "xnorpp": {"method": "xnorpp", "bits": ["W1A1"], "recipe": ADAM},
    "groupnet": {"method": "groupnet", "bits": ["W1A1"], "options": {"base": 3}, "recipe": ADAM},
    "bayesian_bits": {
        "method": "bayesian_bits",
        "bits": ["W32A32"],
        "options": {"gating_lambda": 1.0e-4, "lr_q": 0.05, **GATES},
        "recipe": {**ADAM, "epochs": 2, "schedule": "constant"},
    },
    "bgd": {
        "method": "bgd",
        "bits": ["W8A32"],
        "options": {"em_iterations": 5, "n_activations": 128, "layer_steps": 5, "layer_lr": 0.01, "k_fc": 64},
        "recipe": {"lr": 0.01},
    },
    "pqf": {"method": "pqf", "bits": ["W8A32"], "options": {"sls_iterations": 50, "k_fc": 64}, "recipe": ADAM},
}


def _check_methods(tmp_path: Path, entries: dict[str, dict]) -> None:
    """Each entry as a 2-process cell of 1 epoch (after a 1-process baseline): all finish,
    each process's state dict digested tensor by tensor and found equal."""
    # JSON is YAML: one flow mapping per method
    methods = [{**e, "recipe": {"epochs": 1, **e.get("recipe", {}), "gpus": 2}} for e in entries.values()]
    body = "    baseline: {recipe: {epochs: 1}}\n    methods:\n" + "".join(
        f"      - {json.dumps(m)}\n" for m in methods
    )
    cells, results = run_here(write_suite(tmp_path, "methods", body), tmp_path / "out")
    assert len(results) == len(entries) + 1
    failed = {c.label: r.error for c, r in zip(cells, results, strict=True) if r.status != "done"}
    assert not failed, failed
    df = runs_of(tmp_path / "out")
    ddp = df[df["params.recipe.gpus"].notna()]
    assert len(ddp) == len(entries)
    # the cells fail unless every process's digests agree
    assert set(ddp["tags.qbench.ddp"]) == {"2 processes (gloo), final states identical"}


def test_every_method_ends_with_identical_copies(tmp_path: Path) -> None:
    """All the methods in one suite (one baseline; the failing cells are named), so the
    2-core CI pays one store and one baseline, not one per method."""
    _check_methods(tmp_path, {**METHODS, **MORE})


def test_copies_that_differ_are_named() -> None:
    same = {"a.weight": "1", "a.step": "2"}
    assert differing([same, dict(same)]) == []
    assert differing([same, {"a.weight": "1", "a.step": "3"}]) == ["a.step"]
    assert differing([same, {"a.weight": "1"}]) == ["a.step"]


# -- resume, failures, devices ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_ddp_cell_resumes_from_its_last_epoch(tmp_path: Path) -> None:
    body = "    baseline: {recipe: {epochs: 30, gpus: 2}}\n    methods: []\n"
    path = write_suite(tmp_path, "resume", body)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "qbench.harness.cli", "run", str(path), "--out", str(out), "--no-leaderboard"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed_at, ranks = time.monotonic() + 240, None, []
    while time.monotonic() < deadline and proc.poll() is None:
        ranks = _children(proc.pid) or ranks
        saved = list((out / "cells").glob("*/stage_train.pt")) if (out / "cells").exists() else []
        if saved:
            try:
                epoch = torch.load(saved[0], weights_only=True)["history"]["epoch"]
            except (FileNotFoundError, RuntimeError, EOFError):
                continue
            if epoch >= 3:
                killed_at = epoch
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.1)
    proc.wait()
    assert killed_at is not None and killed_at < 30, "killed mid-cell"
    assert len(ranks) == 2
    gone = time.monotonic() + 15
    while any(_alive(p) for p in ranks) and time.monotonic() < gone:
        time.sleep(0.2)
    assert not any(_alive(p) for p in ranks), "the processes of a killed cell end with it"

    run_suite(path, out)
    df = runs_of(out)
    assert len(df) == 1 and df.iloc[0]["tags.qbench.status"] == "done"
    steps = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(df.iloc[0]["run_id"], "train_loss")]
    # a restart from scratch would log epochs 1..killed_at twice
    assert sorted(steps) == list(range(1, 31)), "one curve, continued from the last checkpoint"


def test_a_failing_process_fails_the_cell_alone(tmp_path: Path) -> None:
    # 100 images do not split among 3 processes: every process refuses at its first batch
    body = """    baseline: {recipe: {epochs: 1}}
    methods:
      - {method: lsq, bits: [W4A4], recipe: {epochs: 1, gpus: 3, batch_size: 100}}
      - {method: lsq, bits: [W8A8], recipe: {epochs: 1}}
"""
    cells, results = run_here(write_suite(tmp_path, "fails", body), tmp_path / "out")
    status = {c.w_bits: r for c, r in zip(cells, results, strict=True)}
    assert status[32].status == "done" and status[8].status == "done"
    assert status[4].status == "failed"
    assert "batch_size: 100" in status[4].error and "gpus: 3" in status[4].error


def test_a_process_that_raises_ends_the_others() -> None:
    # a model name that does not exist: every process fails while building; none is left behind
    with pytest.raises(DDPError, match=r"process \d of 2: QbenchError: .*no_such_model"):
        launch("throughput", _bench_args(model_name="no_such_model"), ["cpu", "cpu"])


def test_fewer_gpus_than_the_recipe_asks_for_is_one_line(tmp_path: Path) -> None:
    body = "    baseline: {recipe: {epochs: 1, gpus: 2}}\n    methods: []\n"
    cells, results = run_here(write_suite(tmp_path, "devices", body), tmp_path / "out", devices=["cuda:0"])
    (res,) = results
    assert res.status == "failed"
    assert "recipe gpus: 2 needs 2 GPUs" in res.error and "cuda:0" in res.error and "\n" not in res.error


# -- throughput ---------------------------------------------------------------------------------


def _bench_args(**kw) -> dict:
    args = dict(
        model_name="small_cnn", image_size=8, batch_per_gpu=16, steps=3, warmup=1, num_classes=10, in_channels=1
    )
    return {**args, **kw}


def test_images_per_second_on_two_gloo_processes() -> None:
    ips = ddp_images_per_second(**_bench_args(), devices=["cpu", "cpu"])
    assert ips > 0 and ips == ips
