"""Bayesian Bits through the real CLI (`qbench run` in a subprocess) on digits: a weak and a
strong regulariser train from the full-precision baseline, with pruning and the BatchNorms
folded into the convs; the strong one learns lower widths and fewer BOPs, the weak one keeps
its accuracy, and the learned widths logged in
MLflow are the ones the footprint (size, BOPs, bit audit) was computed from."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from conftest import run_suite

SUITE = Path(__file__).parent / "suites" / "bb_tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bb")
    run_suite(SUITE, out)
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    df = mlflow.search_runs(search_all_experiments=True)
    bb = df[df["tags.qbench.method"] == "bayesian_bits"]
    by_mu = {float(r["params.options.gating_lambda"]): r for _, r in bb.iterrows()}
    return out, df, by_mu


def test_strong_mu_learns_fewer_bops_than_weak_mu(runs):
    _, df, by_mu = runs
    assert set(df["tags.qbench.status"]) == {"done"} and sorted(by_mu) == [1e-4, 1.0]
    weak, strong = by_mu[1e-4], by_mu[1.0]
    fp32 = df[df["tags.qbench.method"] == "fp32"].iloc[0]
    assert strong["metrics.bops"] < 0.5 * weak["metrics.bops"] < 0.5 * fp32["metrics.bops"]
    assert strong["metrics.bb/relative_bops"] < weak["metrics.bb/relative_bops"] < 100
    assert strong["metrics.bb/mean_w_bits"] < weak["metrics.bb/mean_w_bits"]
    assert strong["metrics.bb/mean_a_bits"] < weak["metrics.bb/mean_a_bits"]
    assert weak["metrics.top1"] > 85, weak["metrics.top1"]
    # the run tag the leaderboard matches against methods/reported/bayesian_bits.yaml
    assert (weak["tags.qbench.notation"], strong["tags.qbench.notation"]) == ("mu=0.0001", "mu=1")


def test_logged_widths_are_the_footprints(runs):
    out, _, by_mu = runs
    client = mlflow.tracking.MlflowClient()
    for mu, row in by_mu.items():
        path = client.download_artifacts(row["run_id"], "footprint.json", str(out / "dl" / str(mu)))
        fp = json.loads(Path(path).read_text())
        assert fp["audit_ok"] is True and row["metrics.bit_audit_ok"] == 1
        assert row["metrics.bops"] == pytest.approx(fp["bops"])
        for lf in fp["layers"]:
            assert lf["w_bits"] == row[f"metrics.bb/w_bits/{lf['name']}"], (mu, lf["name"])
            assert lf["a_bits"] == row[f"metrics.bb/a_bits/{lf['name']}"], (mu, lf["name"])
            assert lf["w_bits"] in (0, 2, 4, 8, 16, 32)
            assert lf["bops"] == round(lf["macs"] * lf["w_bits"] * lf["a_bits"] * lf["kept"])
            if lf["name"] != "fc":  # pruned output channels, as logged (the last layer is never pruned)
                assert 1 - lf["kept"] == pytest.approx(row[f"metrics.bb/pruned_channels/{lf['name']}"])
            if lf["distinct_max"] is not None:
                assert lf["distinct_max"] <= lf["levels_allowed"], (mu, lf["name"])
        assert fp["layers"][0]["a_bits"] == 8  # the image, at 8 bits
