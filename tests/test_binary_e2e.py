"""The binary networks through the real CLI (`qbench run` in a subprocess) on digits: XNOR-Net,
XNOR-Net++ and Group-Net on the small CNN, Bi-Real Net on the Bi-Real ResNet-20, each at 1/1
bits beside its own full-precision baseline. Every binary run learns (well above chance),
passes the bit audit with two values per scale group in every binarised layer, and logs its
size and BOPs (binary MACs at 1 x 1 bit) against the full-precision model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from conftest import run_suite

SUITE = Path(__file__).parent / "suites" / "binary_tiny.yaml"
pytestmark = pytest.mark.slow
BINARY = {"xnor", "xnorpp", "groupnet", "bireal"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("binary")
    run_suite(SUITE, out)
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    df = mlflow.search_runs(search_all_experiments=True)
    return out, {(r["tags.qbench.model"], r["tags.qbench.method"]): r for _, r in df.iterrows()}


def test_every_binary_method_runs_beside_fp32(runs):
    _, by = runs
    assert {m for _, m in by} == BINARY | {"fp32"}
    assert all(r["tags.qbench.status"] == "done" for r in by.values())
    for (model, method), r in by.items():
        if method == "fp32":
            continue
        fp = by[(model, "fp32")]
        assert (r["tags.qbench.w_bits"], r["tags.qbench.a_bits"]) == ("1", "1")
        assert r["metrics.top1"] > 60, (method, r["metrics.top1"])  # chance is 10
        assert r["metrics.bit_audit_ok"] == 1, method
        # against the full-precision model it was built from (Group-Net: not K copies)
        assert r["metrics.fp32_bytes"] == fp["metrics.fp32_bytes"], method
        assert r["metrics.size_bytes"] < fp["metrics.size_bytes"] / 5, method
        assert r["metrics.rel_bops"] < 15, (method, r["metrics.rel_bops"])


def test_binarised_layers_hold_two_values_per_group_and_count_1x1_bops(runs):
    out, by = runs
    client = mlflow.tracking.MlflowClient()
    for (_model, method), r in by.items():
        if method == "fp32":
            continue
        path = client.download_artifacts(r["run_id"], "footprint.json", str(out / "dl" / method))
        fp = json.loads(Path(path).read_text())
        binary = [lf for lf in fp["layers"] if lf["w_bits"] == 1]
        assert binary, method
        for lf in binary:
            assert lf["a_bits"] == 1 and lf["distinct_max"] == 2 and lf["levels_allowed"] == 2, (method, lf)
            assert lf["bops"] == lf["macs"], (method, lf["name"])  # 1 x 1 bit
        assert r["metrics.bops"] == pytest.approx(fp["bops"])
