"""Detection and instance segmentation end to end through the real CLI: ``qbench run
tests/suites/detection_tiny.yaml`` trains FCOS and Mask R-CNN (full precision, then LSQ
W4A4 from them) on digit scenes and records COCO AP in MLflow; a rerun skips every cell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

SUITE = Path(__file__).parent / "suites" / "detection_tiny.yaml"


@pytest.mark.slow
def test_detection_suite_runs_and_records_coco_ap(tmp_path):
    env = {**os.environ, "QBENCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"

    def run() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "qbench.harness.cli", "run", str(SUITE), "--out", str(out), "--device", "cpu"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    res = run()
    assert res.returncode == 0, res.stdout + res.stderr
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    df = mlflow.search_runs(search_all_experiments=True)
    assert len(df) == 4 and set(df["tags.qbench.status"]) == {"done"}
    for _, row in df.iterrows():
        assert 0.0 <= row["metrics.box_ap"] <= 100.0 and row["metrics.n_images"] == 4
        masks = row["tags.qbench.model"].startswith("maskrcnn")
        has_mask_ap = "metrics.mask_ap" in row and not row.isna()["metrics.mask_ap"]
        assert has_mask_ap == masks and (not masks or row["metrics.mask_ap"] >= 0.0)
        assert row["tags.qbench.data_fingerprint"]
    lsq = df[df["tags.qbench.method"] == "lsq"]
    assert (lsq["metrics.compression_ratio"] > 4).all(), "W4 weights store in about an eighth"
    again = run()
    assert again.returncode == 0 and "skip" in (again.stdout + again.stderr).lower()


def test_dry_run_says_which_cells_it_did_not_estimate(tmp_path):
    """Detection and segmentation cells are not timed ahead: the dry run says so instead of
    adding them up as zero seconds."""
    from click.testing import CliRunner
    from qbench.harness.cli import cli

    res = CliRunner().invoke(cli, ["run", str(SUITE), "--dry-run", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "not estimated (detection and segmentation cells are not timed ahead)" in res.output
    assert "about 0 s on one cpu (one timed step" not in res.output
