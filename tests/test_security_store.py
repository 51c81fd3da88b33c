"""Stores and names that come from someone else: what an imported store may read, what a
suite name may write, what a broken run or a broken ``mlflow.db`` may break.

* ``qbench import`` copies only artifacts that live inside the source store's artifact
  root (symlinks resolved); the rest is refused and named.
* A suite (experiment) name never chooses a path: its artifacts stay inside ``--out``.
* A run whose ``footprint.json`` is incomplete, not JSON or a list still gets its pages.
* A 0-byte, truncated or non-MLflow ``mlflow.db`` is one line and exit status 2 from
  ``run``, ``show`` and ``leaderboard``, and is left exactly as it was.

Stores are real MLflow sqlite stores made here through ``MlflowClient`` (the schema is
created once per session and copied, which takes milliseconds)."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

SUITES = Path(__file__).parent / "suites"
SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- not for export"


def qbench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qbench.harness.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@functools.lru_cache(maxsize=1)
def _template_db() -> Path:
    from mlflow.tracking import MlflowClient

    path = Path(tempfile.mkdtemp(prefix="qbench-security-template-")) / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def new_store(folder: Path) -> str:
    """An empty MLflow sqlite store at ``folder/mlflow.db``; returns its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(_template_db(), folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def files(root: Path) -> set[str]:
    """Every file and link under ``root`` (relative paths)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def outside(root: Path, out: Path) -> set[str]:
    """Files under ``root`` that are not under ``out``."""
    return {f for f in files(root) if not (root / f).resolve().is_relative_to(out.resolve())}


def log_run(client, exp_id: str, cell: str, arts: dict[str, str], status: str = "done", **tags: str) -> str:
    """A finished run in qbench's schema with text artifacts ``arts`` (name -> content)."""
    from mlflow.entities import Metric, RunTag

    rid = client.create_run(exp_id, run_name=cell).info.run_id
    all_tags = {
        "qbench.cell_id": cell,
        "qbench.status": status,
        "qbench.method": "fp32",
        "qbench.model": "small_cnn",
        "qbench.dataset": "digits",
        "qbench.w_bits": "32",
        "qbench.a_bits": "32",
        "qbench.seed": "0",
        "qbench.tolerance": "0.5",
        **{"qbench." + k: v for k, v in tags.items()},
    }
    client.log_batch(
        rid,
        metrics=[Metric("top1", 97.0, 0, 0), Metric("size_bytes", 1000.0, 0, 0)],
        tags=[RunTag(k, v) for k, v in all_tags.items()],
    )
    with tempfile.TemporaryDirectory() as d:
        for name, text in arts.items():
            p = Path(d) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            parent = str(Path(name).parent)
            client.log_artifact(rid, str(p), None if parent == "." else parent)
    client.set_terminated(rid, "FINISHED")
    return rid


def artifact_dir(client, rid: str) -> Path:
    from mlflow.utils.file_utils import local_file_uri_to_path

    return Path(local_file_uri_to_path(client.get_run(rid).info.artifact_uri))


def _dst(root: Path):
    from qbench.harness.tracking import Tracker

    new_store(root)
    return Tracker(f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts")


def _dst_artifacts(tracker) -> dict[str, set[str]]:
    """cell id -> the artifact files of its run in the destination store."""
    out = {}
    for cid, rec in tracker.runs().items():
        d = artifact_dir(tracker.client, rec.run_id)
        out[cid] = files(d) if d.exists() else set()
    return out


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A folder outside every store, like ``~/.ssh``."""
    d = tmp_path / "home" / ".ssh"
    d.mkdir(parents=True)
    (d / "id_ed25519").write_text(SECRET)
    return d


@pytest.fixture
def hostile(tmp_path: Path, secret: Path):
    """An ``--out`` folder someone sent: one honest run, and runs whose artifacts point at
    folders outside the store (the run's artifact_uri, the experiment's artifact_location,
    symlinks inside the store's mlartifacts, an http URI)."""
    from mlflow.tracking import MlflowClient

    src = tmp_path / "received"
    uri = new_store(src)
    c = MlflowClient(tracking_uri=uri)
    inside = c.create_experiment("suite", artifact_location=(src / "mlartifacts" / "suite").as_uri())
    log_run(c, inside, "honest", {"config.json": "{}", "checkpoint/model.pt": "weights"})
    # a run whose artifact_uri was rewritten in the database to point at ~/.ssh
    redirected = log_run(c, inside, "redirected", {"config.json": "{}"})
    with sqlite3.connect(src / "mlflow.db") as db:
        db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (secret.as_uri(), redirected))
    db.close()
    # an experiment whose artifact location is a folder outside the store
    elsewhere = tmp_path / "home" / "documents"
    away = c.create_experiment("away", artifact_location=elsewhere.as_uri())
    log_run(c, away, "away", {"notes.txt": "private notes"})
    # symlinks inside the store's own artifact folder that point outside it
    linked = log_run(c, inside, "linked", {"config.json": "{}"})
    d = artifact_dir(c, linked)
    (d / "stolen.txt").symlink_to(secret / "id_ed25519")
    (d / "keys").symlink_to(secret, target_is_directory=True)
    (d / "alias.json").symlink_to(d / "config.json")  # inside the store: fine
    # a run whose artifacts are "on a server" (nothing listens there: it must not be asked)
    remote = log_run(c, inside, "remote", {"config.json": "{}"})
    with sqlite3.connect(src / "mlflow.db") as db:
        db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", ("http://127.0.0.1:9/x", remote))
    db.close()
    return src, uri


# -- 1. qbench import reads only the source store's own artifacts ---------------------------
def test_import_copies_only_artifacts_inside_the_source_store(tmp_path: Path, hostile, secret: Path) -> None:
    """Runs whose artifacts point outside the received store (artifact_uri rewritten to
    ~/.ssh or to an http URL, an experiment located elsewhere, symlinks out of mlartifacts) are imported
    without those files, and each refused location is returned; honest artifacts and a
    symlink that stays inside the store are copied."""
    from qbench.harness.transfer import import_runs

    src, uri = hostile
    dst = _dst(tmp_path / "local")
    res = import_runs(uri, dst)
    copied, already, refused = res
    assert (copied, already) == (5, 0)
    arts = _dst_artifacts(dst)
    assert arts["honest"] == {"config.json", "checkpoint/model.pt"}
    assert arts["redirected"] == set() and arts["away"] == set() and arts["remote"] == set()
    assert arts["linked"] == {"config.json", "alias.json"}
    for f in (tmp_path / "local").rglob("*"):
        assert not f.is_file() or SECRET not in f.read_text(errors="ignore"), f
    text = "\n".join(refused)
    assert len(refused) == 5, refused
    assert secret.as_uri() in text or str(secret) in text
    assert "documents" in text and "stolen.txt" in text and "keys" in text and "http://127.0.0.1:9/x" in text


def test_import_command_names_what_it_skipped(tmp_path: Path, hostile) -> None:
    """``qbench import <out folder>`` says how many artifacts it refused and which."""
    src, _ = hostile
    local = tmp_path / "local"
    new_store(local)
    res = qbench("import", str(src), "--out", str(local))
    assert res.returncode == 0, res.stderr
    assert "imported 5 runs" in res.stdout
    assert "skipped 5 artifacts outside the store:" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert not outside(tmp_path / "local", tmp_path / "local") and SECRET not in "".join(
        (local / f).read_text(errors="ignore") for f in files(local) if (local / f).is_file()
    )


def test_import_of_local_artifacts_from_a_server_store_is_refused(tmp_path: Path, secret: Path) -> None:
    """A store with no local artifact root (here a URI whose scheme is not sqlite or file,
    as for a server) never reads local files through a file: artifact_uri."""
    from qbench.harness import transfer

    src = tmp_path / "src"
    uri = new_store(src)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("suite", artifact_location=(src / "mlartifacts" / "suite").as_uri())
    rid = log_run(c, exp, "cell", {"config.json": "{}"})
    with sqlite3.connect(src / "mlflow.db") as db:
        db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (secret.as_uri(), rid))
    db.close()
    assert transfer.artifact_roots("http://mlflow.example:5000") == []
    dst = _dst(tmp_path / "local")
    copied, _, refused = transfer.import_runs(uri, dst, roots=transfer.artifact_roots("https://server"))
    assert copied == 1 and len(refused) == 1 and _dst_artifacts(dst)["cell"] == set()


# -- 2. names never choose paths ------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "ABS", "..", ".", "a/../../../b", "smoke"])
def test_experiment_names_cannot_choose_the_artifact_folder(tmp_path: Path, name: str) -> None:
    """Whatever the suite is called, its artifact folder is a new folder directly inside
    the artifact root, and a logged artifact lands there."""
    from qbench.harness.tracking import Tracker

    name = str(tmp_path / "abs" / "path") if name == "ABS" else name
    out = tmp_path / "a" / "out"
    uri = new_store(out)
    before = outside(tmp_path, out)
    t = Tracker(uri, out / "mlartifacts")
    eid = t.experiment_id(name)
    assert t.experiment_id(name) == eid
    loc = Path(t.client.get_experiment(eid).artifact_location.removeprefix("file://"))
    assert loc.parent == (out / "mlartifacts").resolve(), loc
    rid = t.client.create_run(eid).info.run_id
    t.log_json(rid, "config.json", {"x": 1})
    assert (artifact_dir(t.client, rid) / "config.json").is_file()
    assert outside(tmp_path, out) == before
    # two names that would make the same slug still get two folders
    other = t.experiment_id(name + "/")
    assert t.client.get_experiment(other).artifact_location != t.client.get_experiment(eid).artifact_location


def test_import_of_experiments_named_like_paths_stays_inside_out(tmp_path: Path) -> None:
    """An imported experiment named with an absolute path or ``../..`` writes its artifacts
    inside the destination's --out, not at that path."""
    from mlflow.tracking import MlflowClient

    src = tmp_path / "src"
    uri = new_store(src)
    c = MlflowClient(tracking_uri=uri)
    names = [str(tmp_path / "evil" / "abs"), "../../evil-rel"]
    for i, name in enumerate(names):
        slug = hashlib.sha1(name.encode()).hexdigest()[:8]
        exp = c.create_experiment(name, artifact_location=(src / "mlartifacts" / slug).as_uri())
        log_run(c, exp, f"cell{i}", {"config.json": "{}"})
    local = tmp_path / "x" / "local"
    new_store(local)
    before = outside(tmp_path, local)
    res = qbench("import", str(src), "--out", str(local))
    assert res.returncode == 0, res.stderr
    assert "imported 2 runs" in res.stdout
    assert outside(tmp_path, local) == before, "nothing written outside --out"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "evil-rel").exists()
    arts = [f for f in files(local / "mlartifacts") if f.endswith("config.json")]
    assert len(arts) == 2


def test_run_with_a_path_suite_name_writes_nothing_outside_out(tmp_path: Path) -> None:
    """``qbench run`` of a suite named ``../../x`` is refused by the suite's validation (one
    line, exit 2) and writes nothing anywhere."""
    suite = tmp_path / "s.yaml"
    suite.write_text(
        textwrap.dedent("""\
            name: ../../x
            defaults: {seeds: [0], recipe: {batch_size: 128}}
            experiments:
              - dataset: digits
                model: small_cnn
                model_options: {width: 8}
                baseline: {recipe: {epochs: 1}}
        """)
    )
    out = tmp_path / "a" / "b" / "out"
    before = files(tmp_path)
    res = qbench("run", str(suite), "--out", str(out), "--no-leaderboard")
    assert res.returncode == 2 and res.stderr.startswith("qbench: error:") and "name" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert files(tmp_path) == before


def test_evaluate_with_a_path_suite_name_writes_inside_out(tmp_path: Path) -> None:
    """``qbench evaluate --suite ../../x`` records the run with its artifacts inside --out
    (an absolute-path name: the Tracker and import tests above)."""
    import torch
    from qbench.harness.models import create_model

    ckpt = tmp_path / "model.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8).state_dict(), ckpt)
    out = tmp_path / "a" / "b" / "out"
    new_store(out)
    before = outside(tmp_path, out)
    res = qbench(
        "evaluate", str(ckpt), "--model", "small_cnn", "--model-option", "width=8", "--dataset", "digits",
        "--device", "cpu", "--suite", "../../x", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "recorded: suite ../../x" in res.stdout
    assert outside(tmp_path, out) == before, "nothing written outside --out"
    assert not (tmp_path / "a" / "x").exists()
    assert len([f for f in files(out / "mlartifacts") if f.endswith("footprint.json")]) == 1


# -- 3. a broken run does not break the site --------------------------------------------------
BROKEN_FOOTPRINTS = {
    "no-fields": "{}",
    "layer-without-fields": json.dumps({"total_bytes": 10, "layers": [{}, {"name": "fc"}, 7, None]}),
    "layers-not-a-list": json.dumps({"layers": 5, "total_bytes": "lots", "bops": [1]}),
    "layers-a-dict": json.dumps({"layers": {"a": 1}}),
    "not-json": "{ this is not json",
    "a-list": json.dumps([1, 2, 3]),
    "a-string": json.dumps("footprint"),
    "nan": '{"total_bytes": NaN, "layers": [{"bytes": Infinity, "macs": "x", "distinct_max": 3}]}',
}


def test_site_renders_runs_with_broken_footprints(tmp_path: Path) -> None:
    """An imported run with an incomplete, non-JSON or list footprint.json (or odd tags)
    gets its run page, and the site and ``qbench leaderboard`` build."""
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient
    from qbench.harness.cli import cli
    from qbench.leaderboard import build_site

    out = tmp_path / "out"
    uri = new_store(out)
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("imported", artifact_location=(out / "mlartifacts" / "imported").as_uri())
    rids = {}
    for i, (cell, fp) in enumerate(BROKEN_FOOTPRINTS.items()):
        rids[cell] = log_run(c, exp, cell, {"footprint.json": fp, "config.json": "[]"}, seed=str(i))
    rids["odd-tags"] = log_run(c, exp, "odd-tags", {"environment.json": "[1]"}, w_bits="inf", a_bits="nan", seed="x")
    rids["good"] = log_run(
        c, exp, "good", {"footprint.json": json.dumps({"total_bytes": 123, "layers": [{"name": "conv1"}]})}, seed="99"
    )
    index = build_site(uri, out)
    html = index.read_text()
    assert "small_cnn" in html
    pages = {p.name for p in (out / "site" / "runs").glob("*.html")}
    assert len(pages) == len(rids)
    good = next((out / "site" / "runs").glob(f"{rids['good']}*.html")).read_text()
    assert "conv1" in good
    res = CliRunner().invoke(cli, ["leaderboard", "--out", str(out)])
    assert res.exit_code == 0, res.output


# -- 4. a broken mlflow.db is one line and exit 2, and is left alone ---------------------------
def _broken_db(kind: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    db = out / "mlflow.db"
    if kind == "empty":
        db.write_bytes(b"")
    elif kind == "truncated":
        shutil.copy(_template_db(), db)
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 3)
    elif kind == "garbage":
        db.write_bytes(b"this is not a database\n" * 200)
    elif kind == "not-mlflow":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE notes (x TEXT)")
        con.commit()
        con.close()
    return db


MESSAGES = {
    "empty": "empty",
    "truncated": "damaged",
    "garbage": "not an SQLite database",
    "not-mlflow": "not an MLflow store",
}
COMMANDS = {
    "run": ["run", str(SUITES / "tiny.yaml"), "--no-leaderboard"],
    "show": ["show", str(SUITES / "tiny.yaml")],
    "leaderboard": ["leaderboard"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_broken_store_is_one_line_and_left_alone(tmp_path: Path, kind: str, command: str) -> None:
    """A 0-byte or truncated mlflow.db: ``run``, ``show`` and ``leaderboard`` print one
    ``qbench: error:`` line naming the file and what to do, exit 2, and neither create,
    replace nor modify anything in --out (before: a traceback, or for the 0-byte file a
    new empty store and every cell trained again)."""
    out = tmp_path / "out"
    db = _broken_db(kind, out)
    digest, stat = hashlib.sha256(db.read_bytes()).hexdigest(), db.stat()
    before = files(out)
    res = qbench(*COMMANDS[command], "--out", str(out))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbench: error:"), res.stderr
    assert MESSAGES[kind] in lines[0] and str(db) in lines[0] and "backup" in lines[0]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    assert db.stat().st_mtime_ns == stat.st_mtime_ns and db.stat().st_size == stat.st_size
    assert files(out) == before


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_tracker_refuses_a_broken_store_and_changes_nothing(tmp_path: Path, kind: str) -> None:
    """Every kind of broken database (0 bytes, truncated, not SQLite, SQLite without MLflow's
    tables) is a QbenchError from Tracker saying which, and the file stays as it was."""
    from qbench.harness.errors import QbenchError
    from qbench.harness.tracking import Tracker

    db = _broken_db(kind, tmp_path)
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(QbenchError, match=MESSAGES[kind]) as e:
        Tracker(f"sqlite:///{db}", tmp_path / "mlartifacts")
    assert e.value.where == str(db)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    assert files(tmp_path) == {"mlflow.db"}


def test_tracker_accepts_a_good_store(tmp_path: Path) -> None:
    """The check lets a valid store through (an absent one is still created: the e2e tests)."""
    from qbench.harness.tracking import Tracker

    uri = new_store(tmp_path)
    t = Tracker(uri, tmp_path / "mlartifacts")
    assert t.experiment_id("s") == t.experiment_id("s")
