"""The harness end to end on digits, through the real CLI in a subprocess: MLflow record,
idempotent reruns, a diverging cell, and a run killed with SIGKILL mid-cell."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

SUITES = Path(__file__).parent / "suites"


def qbench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qbench.harness.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def runs_of(out: Path):
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("tiny")
    res = qbench("run", str(SUITES / "tiny.yaml"), "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res


def test_one_finished_run_per_cell_with_schema(tiny) -> None:
    out, res = tiny
    df = runs_of(out)
    assert len(df) == 3 and set(df["status"]) == {"FINISHED"}
    assert set(df["tags.qbench.status"]) == {"done"}
    assert set(df["tags.qbench.method"]) == {"fp32", "uniform", "lsq"}
    for tag in (
        "cell_id",
        "suite",
        "model",
        "dataset",
        "w_bits",
        "a_bits",
        "seed",
        "code_version",
        "tolerance",
        "data_fingerprint",
    ):
        assert df[f"tags.qbench.{tag}"].notna().all(), tag
    for metric in ("top1", "top5", "size_bytes", "compression_ratio", "bops", "wall_time_s", "bit_audit_ok"):
        assert df[f"metrics.{metric}"].notna().all(), metric
    assert (df["metrics.top1"] > 50).all(), "every cell learned something on real digits"
    assert (df["metrics.bit_audit_ok"] == 1).all()
    assert "params.recipe.lr" in df.columns and "params.method" in df.columns
    lsq = df[df["tags.qbench.method"] == "lsq"].iloc[0]
    fp = df[df["tags.qbench.method"] == "fp32"].iloc[0]
    assert lsq["tags.qbench.parent"] == fp["tags.qbench.cell_id"]
    assert 5 < lsq["metrics.compression_ratio"] < 8, "4-bit codes plus 8-bit first/last layers and scales"
    client = mlflow.tracking.MlflowClient()
    curve = client.get_metric_history(fp["run_id"], "test_top1")
    assert [m.step for m in curve] == [1, 2, 3]
    arts = {a.path for a in client.list_artifacts(lsq["run_id"])}
    assert {"config.json", "environment.json", "footprint.json", "checkpoint"} <= arts
    ckpt = client.download_artifacts(lsq["run_id"], "checkpoint/model.pt", str(out / "dl"))
    state = torch.load(ckpt, weights_only=True)
    assert any(k.endswith("weight_quantizer.step") for k in state)
    assert "leaderboard:" in res.stdout and (out / "site" / "index.html").exists()


def test_rerun_skips_finished_cells_quickly(tiny) -> None:
    out, _ = tiny
    before = runs_of(out)
    t0 = time.monotonic()
    res = qbench("run", str(SUITES / "tiny.yaml"), "--out", str(out), "--no-leaderboard")
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("skipped:") == 3
    assert not [line for line in res.stdout.splitlines() if line.strip().startswith("epoch ")], "nothing trained"
    after = runs_of(out)
    assert sorted(after["run_id"]) == sorted(before["run_id"])
    assert elapsed < 60
    show = qbench("show", str(SUITES / "tiny.yaml"), "--out", str(out))
    assert show.returncode == 0 and show.stdout.count(" done ") == 3


def test_diverging_cell_fails_alone(tmp_path: Path) -> None:
    res = qbench("run", str(SUITES / "diverge.yaml"), "--out", str(tmp_path), "--no-leaderboard")
    assert res.returncode == 1
    assert "1 of 3 cells failed" in res.stderr and "not finite" in res.stderr
    df = runs_of(tmp_path)
    status = dict(zip(df["tags.qbench.method"], df["tags.qbench.status"], strict=True))
    assert status == {"fp32": "done", "uniform": "done", "lsq": "failed"}
    failed = df[df["tags.qbench.method"] == "lsq"].iloc[0]
    assert "not finite" in failed["tags.qbench.error"] and failed["status"] == "FAILED"


def test_sigkill_mid_cell_then_resume(tmp_path: Path) -> None:
    suite = str(SUITES / "long.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qbench.harness.cli", "run", suite, "--out", str(tmp_path), "--no-leaderboard"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    cells = tmp_path / "cells"
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        lasts = list(cells.glob("*/stage_train.pt")) if cells.exists() else []
        if lasts:
            try:
                state = torch.load(lasts[0], weights_only=True)
            except (FileNotFoundError, RuntimeError):  # removed as the baseline finished
                continue
            if state["history"]["epoch"] >= 3:  # the baseline is done, the LSQ cell is mid-way
                killed_at = state["history"]["epoch"]
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.2)
    proc.wait()
    assert killed_at is not None and killed_at < 40, "the run was killed mid-cell"
    first = runs_of(tmp_path)
    base_first = first[first["tags.qbench.method"] == "fp32"].iloc[0]
    assert base_first["tags.qbench.status"] == "done"
    assert first[first["tags.qbench.method"] == "lsq"].iloc[0]["tags.qbench.status"] == "running"

    res = qbench("run", suite, "--out", str(tmp_path), "--no-leaderboard")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "skipped: digits/small_cnn fp32" in res.stdout, "the finished baseline is not retrained"
    epochs_run = [line for line in res.stdout.splitlines() if line.strip().startswith("epoch ")]
    assert len(epochs_run) <= 40 - killed_at + 1, "the killed cell resumed from its last checkpoint"
    df = runs_of(tmp_path)
    assert len(df) == 2 and set(df["tags.qbench.status"]) == {"done"}
    base = df[df["tags.qbench.method"] == "fp32"].iloc[0]
    assert base["run_id"] == base_first["run_id"] and base["end_time"] == base_first["end_time"]
    lsq = df[df["tags.qbench.method"] == "lsq"].iloc[0]
    steps = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(lsq["run_id"], "test_top1")}
    assert steps == set(range(1, 41)), "one curve over all 40 epochs across the two attempts"


def test_import_merges_a_returned_store_once(tiny, tmp_path: Path) -> None:
    out, _ = tiny
    dst = tmp_path / "local"
    res = qbench("import", str(out), "--out", str(dst))
    assert res.returncode == 0, res.stderr
    assert "imported 3 runs" in res.stdout
    src_runs, dst_runs = runs_of(out), runs_of(dst)
    assert sorted(dst_runs["tags.qbench.cell_id"]) == sorted(src_runs["tags.qbench.cell_id"])
    assert set(dst_runs["status"]) == {"FINISHED"}
    fp = dst_runs[dst_runs["tags.qbench.method"] == "fp32"].iloc[0]
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(fp["run_id"], "test_top1")] == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(fp["run_id"])} >= {"config.json", "footprint.json", "checkpoint"}
    again = qbench("import", str(out), "--out", str(dst))
    assert "imported 0 runs" in again.stdout and len(runs_of(dst)) == 3
    bad = qbench("import", str(tmp_path / "nothing-here"), "--out", str(dst))
    assert bad.returncode == 2 and "nothing-here" in bad.stderr
