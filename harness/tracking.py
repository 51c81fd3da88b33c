"""MLflow, the system of record: experiment = suite, run = cell.

Default store: a SQLite database in the output folder (``sqlite:///<out>/mlflow.db``,
artifacts in ``<out>/mlartifacts``); ``--tracking-uri`` points at a team's server
(``qbench server``), which then keeps the artifacts too, so that every worker of a cluster
reaches them.
Browse with ``mlflow ui --backend-store-uri sqlite:///qbench-out/mlflow.db``.

Schema (the constants below; :mod:`qbench.leaderboard.runs` reads them from here): tags
``qbench.cell_id``, ``qbench.group`` (the seed-independent configuration: the runs of one
group are the seeds the leaderboard averages), ``qbench.suite``, ``qbench.method``,
``qbench.method_version``, ``qbench.model``, ``qbench.dataset``, ``qbench.w_bits``,
``qbench.a_bits``, ``qbench.seed``, ``qbench.code_version``, ``qbench.status``
(running|done|failed|killed), ``qbench.recorded``, ``qbench.error``, ``qbench.parent``, ``qbench.tolerance``,
``qbench.comment``, ``qbench.host`` and ``qbench.pid`` (the process running the cell, so a
run left RUNNING by a killed process is told apart from a live one); params: the
flattened resolved cell; metrics: see :mod:`qbench.harness.runner` (per-epoch curves
:data:`CURVES` with step = epoch); artifacts :data:`ARTIFACTS` and ``checkpoint/model.pt``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# A team server that is down should cost seconds, not MLflow's default of minutes of retries
# (the environment still overrides these).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

# MLflow logs a traceback of every database error it then raises; qbench reports it itself.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

#: seconds the first contact with a tracking server may take before it is called unreachable
PROBE_TIMEOUT_S = 5.0

TAG = "qbench."
STATUS = TAG + "status"
CELL_ID = TAG + "cell_id"
GROUP = TAG + "group"
#: set once a run's final metrics, footprint and checkpoint are all logged
RECORDED = TAG + "recorded"
HOST = TAG + "host"
PID = TAG + "pid"
#: the values of the status tag a run can end with (``running`` while a process works on it)
FINAL_STATUSES = ("done", "failed")
#: per-epoch curves (step = epoch)
CURVES = ("train_loss", "train_top1", "test_top1", "test_loss", "val_top1", "lr")
#: SHA-256 of the data a run read (:meth:`qbench.harness.data.base.DataBundle.fingerprint`)
DATA_FINGERPRINT = TAG + "data_fingerprint"
#: the JSON artifacts every run carries
ARTIFACTS = ("config.json", "environment.json", "footprint.json")


def default_uri(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the checkout qbench runs from (``-dirty`` with local changes),
    else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from . import __version__

        return __version__


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    return json.dumps(environment_uncached())


def environment() -> dict[str, Any]:
    """Python, platform, torch, CUDA, GPUs, installed packages and the code version
    (read once per process: the package list does not change while it runs)."""
    return json.loads(_environment())


def environment_uncached() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
        "code_version": code_version(),
    }
    env["packages"] = sorted(f"{d.metadata['Name']}=={d.version}" for d in md.distributions() if d.metadata["Name"])
    return env


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One short request to an MLflow server before anything is logged: a server that is
    down, unknown or that accepts and never answers is a one-line QbenchError within
    ``timeout`` seconds. Any HTTP answer (even 401/404) means it is reachable."""
    import urllib.error
    import urllib.request

    from .errors import QbenchError

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (http/https only)
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            reason = f"no answer within {timeout:.0f} s"
        raise QbenchError(f"the MLflow server is unreachable ({reason}); nothing was recorded", uri) from None


def _owner() -> dict[str, str]:
    return {HOST: socket.gethostname(), PID: str(os.getpid())}


def process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that owns a running run still lives: True/False when it ran on
    this machine, None when that cannot be told from here (another host, no tags)."""
    if tags.get(HOST) != socket.gethostname() or not tags.get(PID, "").isdigit():
        return None
    try:
        os.kill(int(tags[PID]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass
class RunRecord:
    run_id: str
    cell_id: str
    status: str  # done | failed | running
    metrics: dict
    tags: dict
    start_time: int | None = None
    end_time: int | None = None


def safe_folder_name(name: str) -> str:
    """A folder name for ``name`` (a suite, an experiment) that no name can turn into another
    path: a slug of safe characters and a hash of the whole name (``../x`` -> ``x-1f0e...``)."""
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")[:48] or "suite"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


class Tracker:
    """A thin layer over MlflowClient with qbench's schema."""

    def __init__(self, uri: str, artifact_root: Path | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        # a server keeps the artifacts itself (``qbench server`` proxies them): a folder of
        # this machine would be a path no other worker can write
        self.artifact_root = None if uri.startswith(("http://", "https://")) else artifact_root
        # A broken sqlite store: MLflow would silently replace a 0-byte file with a new,
        # empty store (and every cell would train again) and fail on a damaged one with a
        # traceback. Say what is wrong before MLflow opens it, and change nothing.
        db = uri[len("sqlite:///") :].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if db not in ("", ":memory:") and os.path.exists(db):
            import sqlite3
            from urllib.request import pathname2url

            from .errors import QbenchError

            problem = ""
            if os.path.isdir(db):
                problem = "is a folder, not an MLflow database"
            elif os.path.getsize(db) == 0:
                problem = "is empty (0 bytes)"
            else:
                try:  # read-only: neither creates nor modifies the file
                    con = sqlite3.connect(f"file:{pathname2url(os.path.abspath(db))}?mode=ro", uri=True, timeout=30)
                    try:
                        check = con.execute("PRAGMA quick_check").fetchall()
                        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                    finally:
                        con.close()
                except sqlite3.OperationalError:
                    pass  # locked by a writer, a hot journal to roll back, unreadable: MLflow's to say
                except sqlite3.DatabaseError as e:
                    problem = "is not an SQLite database" if "not a database" in str(e) else f"is damaged ({e})"
                else:
                    if [tuple(r) for r in check] != [("ok",)]:
                        problem = f"is damaged (integrity check: {'; '.join(str(r[0]) for r in check[:3])})"
                    elif not {"alembic_version", "experiments", "runs"} <= tables:
                        problem = "is an SQLite database but not an MLflow store (it has no MLflow tables)"
            if problem:
                raise QbenchError(
                    f"the MLflow store {problem}; nothing was changed: restore it from a backup, or move it "
                    "away to start a new store (every cell then runs again)",
                    db,
                )
        if uri.startswith(("http://", "https://")):
            probe_server(uri)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)

    def experiment_id(self, suite: str) -> str:
        exp = self.client.get_experiment_by_name(suite)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        loc = None
        if self.artifact_root is not None:
            # The name never chooses a path (``../../x``, ``/abs/path``, a name from an
            # imported store): one new folder directly inside the artifact root.
            root = self.artifact_root.resolve()
            folder = (root / safe_folder_name(suite)).resolve()
            if folder.parent != root:
                raise RuntimeError(f"artifact folder {folder} of experiment {suite!r} is not inside {root}")
            root.mkdir(parents=True, exist_ok=True)
            loc = folder.as_uri()
        try:
            return self.client.create_experiment(suite, artifact_location=loc)
        except Exception:  # another worker created it a moment ago
            exp = self.client.get_experiment_by_name(suite)
            if exp is None:
                raise
            return exp.experiment_id

    def runs(self) -> dict[str, RunRecord]:
        """The newest run of every cell in the store (all experiments), keyed by cell id."""
        from mlflow.entities import ViewType

        exps = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        out: dict[str, RunRecord] = {}
        if not exps:
            return out
        token = None
        while True:
            page = self.client.search_runs(
                exps,
                filter_string=f"tags.`{CELL_ID}` != ''",
                max_results=5000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            for r in page:
                cid = r.data.tags.get(CELL_ID)
                rec = RunRecord(
                    r.info.run_id,
                    cid,
                    r.data.tags.get(STATUS, "running"),
                    dict(r.data.metrics),
                    dict(r.data.tags),
                    r.info.start_time,
                    r.info.end_time,
                )
                prev = out.get(cid)
                # a finished run wins over a newer unfinished one
                if prev is None or not (prev.status == "done" and rec.status != "done"):
                    out[cid] = rec
            token = page.token
            if not token:
                break
        return out

    def start(self, cell, resume_run_id: str | None = None) -> str:
        """Create the run of ``cell`` (or reopen ``resume_run_id``) and log its identity."""
        if resume_run_id:
            self.client.update_run(resume_run_id, status="RUNNING")
            self.set_tags(resume_run_id, {STATUS: "running", **_owner()})
            return resume_run_id
        from mlflow.entities import Param, RunTag

        run = self.client.create_run(self.experiment_id(cell.suite), run_name=cell.label)
        rid = run.info.run_id
        tags = {
            CELL_ID: cell.id,
            GROUP: cell.group,
            TAG + "suite": cell.suite,
            TAG + "method": cell.method,
            TAG + "method_version": str(cell.method_version),
            TAG + "model": cell.model,
            TAG + "dataset": cell.dataset,
            TAG + "w_bits": str(cell.w_bits),
            TAG + "a_bits": str(cell.a_bits),
            TAG + "seed": str(cell.seed),
            TAG + "code_version": code_version(),
            TAG + "parent": cell.parent or "",
            TAG + "tolerance": str(cell.tolerance),
            TAG + "comment": cell.comment,
            STATUS: "running",
            **_owner(),
        }
        params = flatten({k: v for k, v in cell.config().items() if k not in ("comment",)})
        self.client.log_batch(
            rid,
            params=[Param(k, v[:6000]) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        self.log_json(rid, "config.json", cell.config())
        self.log_json(rid, "environment.json", environment())
        return rid

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        )

    def log_json(self, run_id: str, name: str, obj: Any) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2, default=str))
            self.client.log_artifact(run_id, str(p))

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:  # one request, not one per tag (a server far away, many workers)
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str, error: str = "") -> None:
        """End a run: ``done`` (FINISHED), ``failed`` (FAILED) or ``killed`` (KILLED: the
        next ``qbench run`` resumes it from its checkpoint)."""
        self.set_tags(run_id, {STATUS: status, TAG + "error": error[:4000]})
        mlflow_status = {"done": "FINISHED", "killed": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(run_id, status=mlflow_status)

    def delete(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def download(self, run_id: str, path: str, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))
