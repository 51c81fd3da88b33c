"""BGD and PQF end to end through the real CLI (`qbench run` in a subprocess) on digits:
compress a small CNN trained by the suite's baseline, fine-tune, evaluate; the footprint
counts codes and codebooks; a run's own checkpoint evaluates back to the same top-1."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from conftest import run_suite

SUITE = Path(__file__).parent / "suites" / "pq_tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pq")
    run_suite(SUITE, out, timeout=900)
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    df = mlflow.search_runs(search_all_experiments=True)
    return out, df


def _footprint(run_id: str, out: Path) -> dict:
    client = mlflow.tracking.MlflowClient()
    path = client.download_artifacts(run_id, "footprint.json", str(out / "dl" / run_id))
    return json.loads(Path(path).read_text())


def test_both_methods_compress_and_keep_accuracy(runs):
    out, df = runs
    assert set(df["tags.qbench.status"]) == {"done"}
    fp32 = df[df["tags.qbench.method"] == "fp32"].iloc[0]
    for method in ("bgd", "pqf"):
        row = df[df["tags.qbench.method"] == method].iloc[0]
        assert row["metrics.top1"] > fp32["metrics.top1"] - 5, method
        assert row["metrics.compression_ratio"] > 5, method
        assert row["metrics.bit_audit_ok"] == 1
        fp = _footprint(row["run_id"], out)
        kinds = {lf["name"]: lf["kind"] for lf in fp["layers"]}
        assert kinds["features.0"] == "Conv2d"  # the first convolution stays full precision
        assert kinds["features.3"] == "PQConv2d" and kinds["fc"] == "PQLinear", kinds
        assert row["metrics.size_bytes"] == pytest.approx(fp["total_bytes"])


def test_a_run_checkpoint_evaluates_back(runs):
    out, df = runs
    row = df[df["tags.qbench.method"] == "bgd"].iloc[0]
    cell = row["tags.qbench.cell_id"]
    ckpt = out / "cells" / cell / "model.pt"
    options = json.loads(
        Path(
            mlflow.tracking.MlflowClient().download_artifacts(row["run_id"], "config.json", str(out / "cfg"))
        ).read_text()
    )["options"]
    from qbench.harness.evaluate import evaluate_checkpoint

    m = evaluate_checkpoint(
        ckpt,
        model="small_cnn",
        dataset="digits",
        method="bgd",
        bits="W8A32",
        options=options,
        model_options={"width": 16},
        device="cpu",
        track=False,
    )
    assert m["top1"] == pytest.approx(row["metrics.top1"])
    assert m["size_bytes"] == pytest.approx(row["metrics.size_bytes"])
