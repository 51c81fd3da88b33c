"""Every quantization method through the real CLI (`qbench run` in a subprocess) on digits:
each cell finishes, learns, passes the bit audit, and records its footprint and BOPs in
MLflow, consistent with the stored footprint.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

SUITE = Path(__file__).parent / "suites" / "easyquant_tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("easyquant")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "qbench.harness.cli",
            "run",
            str(SUITE),
            "--out",
            str(out),
            "--no-leaderboard",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    df = mlflow.search_runs(search_all_experiments=True)
    return out, df


def _footprint(run_id: str, out: Path) -> dict:
    client = mlflow.tracking.MlflowClient()
    path = client.download_artifacts(run_id, "footprint.json", str(out / "dl" / run_id))
    return json.loads(Path(path).read_text())


def test_every_method_finishes_and_learns(runs):
    _, df = runs
    assert len(df) == 7 and set(df["tags.qbench.status"]) == {"done"}
    assert set(df["tags.qbench.method"]) == {"fp32", "uniform", "lsq", "dorefa", "pact", "lqnet"}
    assert (df["metrics.top1"] > 50).all(), df[["tags.qbench.method", "metrics.top1"]]


def test_audit_footprint_and_bops_are_recorded(runs):
    out, df = runs
    fp32 = df[df["tags.qbench.method"] == "fp32"].iloc[0]
    for _, row in df.iterrows():
        method = row["tags.qbench.method"]
        assert row["metrics.bit_audit_ok"] == 1, method
        fp = _footprint(row["run_id"], out)
        assert fp["audit_ok"] is True
        assert row["metrics.size_bytes"] == pytest.approx(fp["total_bytes"])
        assert row["metrics.bops"] == pytest.approx(fp["bops"])
        assert row["metrics.bops"] == pytest.approx(sum(lf["bops"] for lf in fp["layers"]))
        for lf in fp["layers"]:
            assert lf["bops"] == lf["macs"] * lf["w_bits"] * lf["a_bits"], (method, lf["name"])
            if lf["distinct_max"] is not None:
                assert lf["distinct_max"] <= lf["levels_allowed"], (method, lf["name"])
        if method == "fp32":
            assert row["metrics.compression_ratio"] == pytest.approx(1.0)
            continue
        bits = int(row["tags.qbench.w_bits"])
        quantized = [lf for lf in fp["layers"] if lf["w_bits"] == bits]
        assert quantized, method
        assert row["metrics.compression_ratio"] > 2, method
        assert row["metrics.bops"] < fp32["metrics.bops"], method


def test_lqnet_ternary_holds_three_levels(runs):
    out, df = runs
    lq = df[df["tags.qbench.method"] == "lqnet"]
    levels = sorted(
        max(lf["levels_allowed"] for lf in _footprint(r["run_id"], out)["layers"] if lf["levels_allowed"])
        for _, r in lq.iterrows()
    )
    assert levels == [3, 4]
    for _, r in lq.iterrows():
        fp = _footprint(r["run_id"], out)
        assert all(lf["distinct_max"] <= 3 for lf in fp["layers"] if lf["levels_allowed"] == 3)
