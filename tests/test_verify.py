"""`qbench verify RUN`: a run's checkpoint scored again gives its logged top-1 to the image
(PASS, exit 0); a checkpoint altered in one weight gives a FAIL naming the difference in
images and points (exit 1); a bundled run is verified from its checkpoint file, which must
be the one whose SHA-256 the bundle recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import run_suite
from qbench.harness.cli import cli
from qbench.leaderboard.runs import fetch_runs

SUITE = Path(__file__).parent / "suites" / "verify_tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    run_suite(SUITE, out)
    return out


def _lsq(out: Path):
    return next(r for r in fetch_runs(f"sqlite:///{out / 'mlflow.db'}") if r.tag("method") == "lsq")


def _altered(out: Path, tmp_path: Path) -> Path:
    """The LSQ cell's checkpoint with one weight changed: the classifier's bias of class 3."""
    run = _lsq(out)
    src = out / "cells" / run.cell_id / "model.pt"
    state = torch.load(src, weights_only=True)
    key = next(k for k in state if k.endswith("fc.bias"))
    state[key][3] += 1000.0
    path = tmp_path / "altered.pt"
    torch.save(state, path)
    return path


def test_the_logged_top1_is_confirmed_to_the_image(out):
    run = _lsq(out)
    for key in (run.cell_id, run.run_id):
        res = CliRunner().invoke(cli, ["verify", key, "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert res.output.startswith("PASS ") and f"of {int(run.metrics['n_images'])} images" in res.output


def test_a_checkpoint_altered_in_one_weight_fails_with_the_difference(out, tmp_path):
    run = _lsq(out)
    res = CliRunner().invoke(
        cli, ["verify", run.cell_id, "--out", str(out), "--device", "cpu", "--checkpoint", str(_altered(out, tmp_path))]
    )
    assert res.exit_code == 1, res.output
    assert res.output.startswith("FAIL ") and " images (" in res.output and "points" in res.output
    logged = round(run.metrics["top1"] * run.metrics["n_images"] / 100)
    assert f"vs {logged:,} of" in res.output


def test_a_bundled_run_is_verified_from_its_own_checkpoint_file(out, tmp_path):
    bundle = tmp_path / "results"
    assert CliRunner().invoke(cli, ["import", str(out), "--bundle", str(bundle)]).exit_code == 0
    run = _lsq(out)
    empty = tmp_path / "mine"  # a user's store without the run: found in the bundle
    args = ["verify", run.cell_id, "--out", str(empty), "--bundle", str(bundle), "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "--checkpoint" in res.output
    ckpt = out / "cells" / run.cell_id / "model.pt"
    res = CliRunner().invoke(cli, [*args, "--checkpoint", str(ckpt)])
    assert res.exit_code == 0 and res.output.startswith("PASS "), res.output
    res = CliRunner().invoke(cli, [*args, "--checkpoint", str(_altered(out, tmp_path))])
    assert res.exit_code == 2 and "not the run's checkpoint" in res.output
    res = CliRunner().invoke(cli, ["verify", "0000000000000000", "--out", str(empty), "--bundle", str(bundle)])
    assert res.exit_code == 2 and "0000000000000000" in res.output


def test_runs_record_their_data_fingerprint_and_other_data_fail(out):
    from mlflow.tracking import MlflowClient
    from qbench.harness.data import load_dataset

    run = _lsq(out)
    digits = load_dataset("digits")
    assert run.tag("data_fingerprint") == digits.fingerprint()
    digits.test.images[0, 0, 0, 0] ^= 1  # one pixel of one test image
    assert digits.fingerprint() != run.tag("data_fingerprint")
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    client.set_tag(run.run_id, "qbench.data_fingerprint", "0" * 64)
    try:
        res = CliRunner().invoke(cli, ["verify", run.cell_id, "--out", str(out), "--device", "cpu"])
    finally:
        client.set_tag(run.run_id, "qbench.data_fingerprint", run.tag("data_fingerprint"))
    assert res.exit_code == 1 and "not the data the run read" in res.output, res.output


def test_retrain_trains_the_cell_again_and_judges_it_against_the_seeds(out, tmp_path):
    """--retrain rebuilds the LSQ cell and its full-precision parent from their logged configs,
    trains both again (here on the CPU, where the same seed gives the same top-1) and PASSes;
    against a bundle whose runs of that group logged a top-1 20 points higher, the same
    retrained number falls outside the seeds' range and FAILs (exit 1), naming both."""
    import json

    run = _lsq(out)
    retrained = tmp_path / "again"
    args = ["verify", run.cell_id, "--retrain", "--device", "cpu", "--retrain-out", str(retrained)]
    res = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    verdict = res.output.strip().splitlines()[-1]  # after the retraining's progress lines
    assert verdict.startswith("PASS ") and f"retrained top-1 {run.metrics['top1']:.2f}%" in verdict
    again = fetch_runs(f"sqlite:///{retrained / 'mlflow.db'}")
    assert sorted(r.tag("method") for r in again) == ["fp32", "lsq"]  # the parent was trained again
    assert {r.cell_id for r in again} >= {run.cell_id}

    bundle = tmp_path / "results"
    assert CliRunner().invoke(cli, ["import", str(out), "--bundle", str(bundle)]).exit_code == 0
    (path,) = [p for p in bundle.rglob(f"{run.cell_id}.json")]
    record = json.loads(path.read_text())
    record["metrics"]["top1"] = run.metrics["top1"] + 20.0
    path.write_text(json.dumps(record))
    empty = tmp_path / "mine"
    res = CliRunner().invoke(cli, [*args[:-2], "--out", str(empty), "--bundle", str(bundle)])
    assert res.exit_code == 1, res.output
    verdict = res.output.strip().splitlines()[-1]
    assert verdict.startswith("FAIL ") and "outside the seeds' range" in verdict
    res = CliRunner().invoke(cli, [*args, "--out", str(out), "--checkpoint", str(path)])
    assert res.exit_code == 2 and "--checkpoint" in res.output
