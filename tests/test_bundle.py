"""The results bundle (qbench.leaderboard.bundle): `qbench import STORE --bundle DIR` writes one
small JSON file per cell (with its checkpoint's SHA-256), importing twice changes nothing,
the leaderboard merges the bundle beside the user's store (the store's own run of a cell
wins) and marks the bundled rows, and a damaged bundle file is a one-line error."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from qbench.harness.cli import cli
from qbench.harness.tracking import safe_folder_name
from qbench.leaderboard.bundle import load_bundle
from qbench.leaderboard.site import build_site
from qbench.leaderboard.table import leaderboard_table
from test_leaderboard import Store

FP, LSQ = "0123456789abcdef", "fedcba9876543210"


def _store(root: Path, suite: str = "gpu-campaign", lsq_top1: float = 91.5) -> Store:
    s = Store(root)
    s.run("fp32", 32, 32, 0, 92.0, suite=suite, dataset="cifar10", model="resnet20", cell_id=FP)
    rid = s.run("lsq", 4, 4, 0, lsq_top1, suite=suite, dataset="cifar10", model="resnet20", cell_id=LSQ, parent=FP)
    with tempfile.TemporaryDirectory() as d:  # a checkpoint inside the store's artifact folder
        p = Path(d) / "model.pt"
        p.write_bytes(b"weights of the lsq cell")
        s.client.log_artifact(rid, str(p), "checkpoint")
    return s


def test_import_writes_one_file_per_cell_with_the_checkpoint_hash_and_twice_changes_nothing(tmp_path):
    store = _store(tmp_path / "gpu")
    bundle = tmp_path / "results"
    res = CliRunner().invoke(cli, ["import", str(tmp_path / "gpu"), "--bundle", str(bundle)])
    assert res.exit_code == 0, res.output
    assert "bundled 2 runs" in res.output and "1 without a checkpoint" in res.output
    folder = bundle / safe_folder_name("gpu-campaign")
    assert sorted(p.name for p in folder.iterdir()) == [f"{FP}.json", f"{LSQ}.json"]
    rec = json.loads((folder / f"{LSQ}.json").read_text())
    assert rec["checkpoint_sha256"] == hashlib.sha256(b"weights of the lsq cell").hexdigest()
    assert rec["metrics"]["top1"] == 91.5 and rec["tags"]["qbench.method"] == "lsq"
    assert [p[0] for p in rec["curves"]["test_top1"]] == [1, 2, 3]
    assert rec["artifacts"]["footprint.json"]["audit_ok"] is True
    assert json.loads((folder / f"{FP}.json").read_text())["checkpoint_sha256"] is None
    before = {p: p.read_text() for p in folder.iterdir()}
    again = CliRunner().invoke(cli, ["import", str(tmp_path / "gpu"), "--bundle", str(bundle)])
    assert again.exit_code == 0 and "bundled 0 runs" in again.output and "2 unchanged" in again.output
    assert {p: p.read_text() for p in folder.iterdir()} == before
    runs = load_bundle(bundle)
    assert {r.cell_id for r in runs} == {FP, LSQ} and {r.source for r in runs} == {"bundle"}
    assert store.uri  # the source store is only read


def test_a_suite_name_chooses_no_path(tmp_path):
    _store(tmp_path / "gpu", suite="../../escape")
    bundle = tmp_path / "results"
    assert CliRunner().invoke(cli, ["import", str(tmp_path / "gpu"), "--bundle", str(bundle)]).exit_code == 0
    files = [p.relative_to(bundle) for p in bundle.rglob("*.json")]
    assert len(files) == 2 and all(len(p.parts) == 2 and p.parts[0].startswith("escape-") for p in files)
    assert [p for p in tmp_path.rglob("*.json") if p.stem in (FP, LSQ) and bundle not in p.parents] == []


def test_leaderboard_merges_the_bundle_and_the_users_own_run_wins(tmp_path):
    _store(tmp_path / "gpu")
    bundle = tmp_path / "results"
    CliRunner().invoke(cli, ["import", str(tmp_path / "gpu"), "--bundle", str(bundle)])
    # a user with an empty store sees the bundled rows, marked as such
    mine = Store(tmp_path / "mine")
    index = build_site(mine.uri, tmp_path / "out", bundle=bundle).read_text()
    assert index.count('<span class="badge b-bundle" title=') == 2  # both rows (and the legend)
    assert "91.50" in index and "checkpoint SHA-256" in "".join(
        p.read_text() for p in (tmp_path / "out" / "site" / "runs").glob("*.html")
    )
    assert leaderboard_table(mine.uri, bundle=None).empty or not leaderboard_table(mine.uri, bundle=None)["n"].any()
    # the user's own run of the same cell replaces the bundled one
    mine.run("lsq", 4, 4, 0, 90.25, suite="gpu-campaign", dataset="cifar10", model="resnet20", cell_id=LSQ, parent=FP)
    table = leaderboard_table(mine.uri, bundle=bundle)
    lsq = table[(table["method"] == "lsq") & (table["n"] > 0)].iloc[0]
    assert lsq["reproduced"] == 90.25 and lsq["runs_from"] == "store"
    fp = table[(table["method"] == "fp32") & (table["n"] > 0)].iloc[0]
    assert fp["runs_from"] == "bundle"
    res = CliRunner().invoke(
        cli, ["leaderboard", "--out", str(tmp_path / "mine"), "--no-bundle", "--format", "csv", "--output", "-"]
    )
    assert res.exit_code == 0 and "92.0" not in res.output  # the bundled FP32 run is left out


@pytest.mark.parametrize(
    "content, problem",
    [("{not json", "unreadable"), ('{"bundle_version": 1, "run_id": 3}', "run_id"), ("[]", "bundle_version")],
)
def test_a_damaged_bundle_file_is_one_line_naming_it(tmp_path, content, problem):
    bad = tmp_path / "results" / "x-0123456789" / f"{FP}.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    res = CliRunner().invoke(cli, ["leaderboard", "--out", str(tmp_path / "o"), "--bundle", str(tmp_path / "results")])
    assert res.exit_code == 2, res.output
    assert str(bad) in res.output and problem in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "site").exists()


def test_importing_a_moved_copy_of_the_store_keeps_the_artifacts_and_hash_the_bundle_holds(tmp_path):
    _store(tmp_path / "gpu")
    bundle = tmp_path / "results"
    assert CliRunner().invoke(cli, ["import", str(tmp_path / "gpu"), "--bundle", str(bundle)]).exit_code == 0
    rec_path = bundle / safe_folder_name("gpu-campaign") / f"{LSQ}.json"
    first = json.loads(rec_path.read_text())
    # the store brought back into another folder: its runs point at artifact folders that are gone
    (tmp_path / "gpu").rename(tmp_path / "elsewhere")
    res = CliRunner().invoke(cli, ["import", str(tmp_path / "elsewhere"), "--bundle", str(bundle)])
    assert res.exit_code == 0, res.output
    assert "2 without a checkpoint" in res.output and "2 unchanged" in res.output
    assert json.loads(rec_path.read_text()) == first
