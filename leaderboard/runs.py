"""Read qbench's runs from any MLflow tracking URI through MLflow's public client.

The schema is the one :mod:`qbench.harness.tracking` writes and declares (its constants are
imported from there, not copied): experiment = suite, run = cell, tags ``qbench.*`` (the
seed groups the leaderboard averages come from ``qbench.group``), params = the flattened
resolved cell, final metrics, per-epoch curves (step = epoch) and the JSON artifacts. Only
the leaderboard's needs are read; nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from qbench.harness.tracking import ARTIFACTS, CURVES, GROUP, TAG  # also sets MLflow's environment
from qbench.harness.tracking import FINAL_STATUSES as STATUSES

#: params that differ between the seeds of one configuration (and so are not part of it)
_PER_SEED = {"id", "seed", "parent", "suite", "tolerance", "comment"}


@dataclass
class Run:
    """One MLflow run of a qbench cell, as the leaderboard needs it."""

    run_id: str
    experiment: str
    experiment_id: str
    name: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int | None = None
    end_time: int | None = None
    group: str = ""  # the seed-independent configuration (see :func:`group_key`)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    #: where the leaderboard read it: "store" (the user's MLflow store) or "bundle" (the
    #: results bundle in the repository, :mod:`qbench.leaderboard.bundle`)
    source: str = "store"
    #: SHA-256 of the run's checkpoint, as the bundle recorded it (None: not known)
    checkpoint_sha256: str | None = None

    def tag(self, key: str, default: str = "") -> str:
        return self.tags.get(TAG + key, default)

    @property
    def cell_id(self) -> str:
        return self.tag("cell_id")

    def bits(self, which: str) -> int | None:
        v = self.tag(which + "_bits") or self.params.get(which + "_bits", "")
        try:
            return int(float(v))
        except (ValueError, OverflowError):  # not a number, nan, inf
            return None

    @property
    def seed(self) -> str:
        return self.tag("seed") or self.params.get("seed", "")

    @property
    def tolerance(self) -> float | None:
        try:
            t = float(self.tag("tolerance"))
        except ValueError:
            return None
        return t if math.isfinite(t) and t >= 0 else None


def _local_sqlite_missing(uri: str) -> bool:
    """A default store that was never created holds no runs; do not create it by reading."""
    if not uri.startswith("sqlite:///"):
        return False
    path = uri[len("sqlite:///") :]
    return path not in ("", ":memory:") and not Path(path).exists()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def fetch_runs(tracking_uri: str, details: bool = True) -> list[Run]:
    """Every qbench run (status done or failed) of every active experiment of the store.

    Where a cell was run more than once, its newest finished run wins, else its newest
    failed one. ``details`` also reads the curves and the JSON artifacts of each run.
    """
    if _local_sqlite_missing(tracking_uri):
        return []
    from mlflow.entities import ViewType

    client = _client(tracking_uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
    if not experiments:
        return []
    found: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            list(experiments),
            filter_string=f"tags.`{TAG}cell_id` != ''",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        for r in page:
            tags = dict(r.data.tags)
            status = tags.get(TAG + "status", "")
            if status not in STATUSES:
                continue  # running (or unknown): not a result yet
            found.append(
                Run(
                    run_id=r.info.run_id,
                    experiment=experiments.get(r.info.experiment_id, ""),
                    experiment_id=r.info.experiment_id,
                    name=tags.get("mlflow.runName", r.info.run_name or ""),
                    status=status,
                    tags=tags,
                    params=dict(r.data.params),
                    metrics=dict(r.data.metrics),
                    start_time=r.info.start_time,
                    end_time=r.info.end_time,
                )
            )
        token = page.token
        if not token:
            break

    newest: dict[str, Run] = {}
    for run in found:  # oldest first, so a later run replaces an earlier one
        key = run.experiment + "\0" + run.cell_id
        prev = newest.get(key)
        if prev is None or not (prev.status == "done" and run.status != "done"):
            newest[key] = run
    runs = list(newest.values())
    assign_groups(runs)
    if details:
        for run in runs:
            load_details(client, run)
    return runs


def group_key(run: Run, by_cell: dict[str, Run], _depth: int = 0) -> str:
    """For runs without a ``qbench.group`` tag (recorded before it existed): a hash of the
    run's resolved configuration without what varies per seed.

    The parent cell (a per-seed id) is replaced by the parent's own group key, so a
    progressive chain (4 -> 3 bits) and a cell initialised from the baseline stay apart.
    """
    cfg = {k: v for k, v in run.params.items() if k.split(".")[0] not in _PER_SEED}
    parent_id = run.tag("parent") or run.params.get("parent", "")
    if parent_id and parent_id != "None":
        parent = by_cell.get(parent_id)
        cfg["parent"] = group_key(parent, by_cell, _depth + 1) if parent is not None and _depth < 50 else "?"
    for k in ("dataset", "model", "method", "w_bits", "a_bits", "notation", "task"):
        cfg["tag:" + k] = run.tag(k)
    blob = json.dumps(cfg, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def assign_groups(runs: list[Run]) -> None:
    """Each run's group: its ``qbench.group`` tag (written by the harness: the seed-independent
    configuration), within its experiment. Runs recorded before that tag existed get theirs
    re-derived from their params by :func:`group_key`."""
    by_cell = {r.cell_id: r for r in runs}
    for r in runs:
        r.group = r.experiment + ":" + (r.tags.get(GROUP) or group_key(r, by_cell))


def load_details(client, run: Run) -> None:
    """Curves (metric history, step = epoch) and the JSON artifacts of one run."""
    for key in CURVES:
        if key not in run.metrics:
            continue
        try:
            hist = client.get_metric_history(run.run_id, key)
        except Exception:  # a store that cannot serve history: the page says so
            continue
        by_step: dict[int, float] = {}
        for m in sorted(hist, key=lambda m: (m.step, m.timestamp)):
            if m.step >= 1:  # epochs count from 1; step 0 holds final metrics (test_loss)
                by_step[int(m.step)] = float(m.value)  # a resumed epoch logs again: keep the last
        if by_step:
            run.curves[key] = sorted(by_step.items())
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARTIFACTS:
            try:
                path = client.download_artifacts(run.run_id, name, tmp)
                run.artifacts[name] = json.loads(Path(path).read_text(encoding="utf-8"))
            except Exception:  # absent (a failed run) or unreadable: shown as missing
                continue


def public_uri(uri: str) -> str:
    """A tracking URI without credentials (``https://user:token@host`` -> ``https://host``)."""
    p = urlparse(uri)
    if p.username or p.password:
        host = p.hostname or ""
        if p.port:
            host += f":{p.port}"
        return urlunparse(p._replace(netloc=host))
    return uri


def run_url(tracking_uri: str, run: Run) -> str | None:
    """The run's page on an MLflow server, when the store is one (http/https)."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return None
    base = public_uri(tracking_uri).rstrip("/")
    return f"{base}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
