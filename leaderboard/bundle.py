"""The results bundle: runs reproduced elsewhere (GPU machines), kept in the repository as
small, diffable JSON files, and merged into the leaderboard beside the user's own runs.

Layout: ``<bundle>/<suite folder>/<cell id>.json``, one file per cell (its newest finished
or failed run), where the suite folder is a slug and a hash of the suite name (a name from
a store never chooses a path) and the cell id is qbench's 16 hex digits. A file holds what
the leaderboard shows and what ``qbench verify`` needs::

    {"bundle_version": 1, "run_id": ..., "experiment": <suite>, "name": ..., "status": ...,
     "start_time": ..., "end_time": ..., "tags": {...}, "params": {...}, "metrics": {...},
     "curves": {"test_top1": [[1, 41.2], ...], ...},
     "artifacts": {"config.json": ..., "environment.json": ..., "footprint.json": ...},
     "checkpoint_sha256": "<hex>" | null}

``qbench import STORE --bundle DIR`` writes it from a store (a GPU machine's ``--out``
folder); ``qbench leaderboard`` reads the shipped bundle (``results/``; ``QBENCH_BUNDLE``
or ``--bundle`` name another, ``--no-bundle`` none) unless told otherwise, and a
cell the user's store also holds is shown from the store (their own run wins). A malformed
file is a one-line error naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from qbench.harness.errors import QbenchError
from qbench.harness.tracking import safe_folder_name

from .runs import Run, assign_groups

VERSION = 1
#: the bundle shipped with the repository (``results/`` beside the package folders)
SHIPPED = Path(__file__).resolve().parents[1] / "results"
#: the ``bundle`` argument that means: the ``QBENCH_BUNDLE`` folder if set (empty: none),
#: else the shipped bundle
DEFAULT = "default"


def resolve_bundle(bundle: Path | str | None) -> Path | None:
    """The bundle folder ``bundle`` names (see :data:`DEFAULT`); None: no bundle."""
    if bundle == DEFAULT:
        env = os.environ.get("QBENCH_BUNDLE")
        if env is None:
            return SHIPPED
        return Path(env).expanduser() if env.strip() else None
    return None if bundle is None else Path(bundle)


#: qbench's cell ids: the file name of a run
CELL_ID = re.compile(r"^[0-9a-f]{16}$")
_STR_MAPS = ("tags", "params")
#: the run's checkpoint artifact (:func:`qbench.harness.runner.record`)
CHECKPOINT = "checkpoint/model.pt"


def _number(v: float) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def run_record(run: Run, checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """The bundle's JSON object for one run (finite metrics only: JSON has no NaN)."""
    return {
        "bundle_version": VERSION,
        "run_id": run.run_id,
        "experiment": run.experiment,
        "name": run.name,
        "status": run.status,
        "start_time": run.start_time,
        "end_time": run.end_time,
        "tags": dict(sorted(run.tags.items())),
        "params": dict(sorted(run.params.items())),
        "metrics": {k: v for k, v in sorted(run.metrics.items()) if _number(v) is not None},
        "curves": {
            k: [[int(s), float(v)] for s, v in pts if _number(v) is not None] for k, pts in sorted(run.curves.items())
        },
        "artifacts": dict(sorted(run.artifacts.items())),
        "checkpoint_sha256": checkpoint_sha256,
    }


def record_path(root: Path, experiment: str, cell_id: str) -> Path:
    if not CELL_ID.match(cell_id):
        raise QbenchError(f"not a qbench cell id: {cell_id!r}", "bundle")
    return root / safe_folder_name(experiment) / f"{cell_id}.json"


def _keep_what_the_bundle_knows(record: dict[str, Any], old_text: str | None) -> dict[str, Any]:
    """The same run imported again from a copy of its store that lacks files (a store moved
    to another folder, or slimmed before it travelled) keeps the artifacts and checkpoint
    SHA-256 the bundle already holds for it (``old_text``: its file there, if any); a
    different run of the cell replaces it."""
    try:
        old = json.loads(old_text) if old_text is not None else None
    except json.JSONDecodeError:
        return record
    if not isinstance(old, dict) or old.get("run_id") != record["run_id"]:
        return record
    if isinstance(old.get("artifacts"), dict):
        record["artifacts"] = dict(sorted({**old["artifacts"], **record["artifacts"]}.items()))
    if record["checkpoint_sha256"] is None and isinstance(old.get("checkpoint_sha256"), str):
        record["checkpoint_sha256"] = old["checkpoint_sha256"]
    return record


def write_bundle(runs: list[tuple[Run, str | None]], root: Path) -> tuple[int, int]:
    """Write each (run, checkpoint SHA-256) to ``root``; returns (written, unchanged). A file
    is rewritten only when its content changes, so importing twice changes nothing."""
    written = unchanged = 0
    for run, sha in runs:
        path = record_path(root, run.experiment, run.cell_id)
        try:
            old_text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            old_text = None
        record = _keep_what_the_bundle_knows(run_record(run, sha), old_text)
        text = json.dumps(record, indent=1, sort_keys=False, ensure_ascii=False) + "\n"
        if old_text == text:
            unchanged += 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written += 1
    return written, unchanged


def _str_map(v: Any, where: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise QbenchError("expected a mapping of strings to strings", where)
    return v


def _run_from(obj: Any, path: Path) -> Run:
    where = str(path)
    if not isinstance(obj, dict) or obj.get("bundle_version") != VERSION:
        raise QbenchError(f"not a qbench results-bundle file (bundle_version {VERSION})", where)
    for key in ("run_id", "experiment", "name", "status"):
        if not isinstance(obj.get(key), str):
            raise QbenchError(f"{key} must be a string", f"{where}: {key}")
    tags, params = (_str_map(obj.get(k), f"{where}: {k}") for k in _STR_MAPS)
    metrics = obj.get("metrics")
    if not isinstance(metrics, dict) or not all(_number(v) is not None for v in metrics.values()):
        raise QbenchError("metrics must map names to finite numbers", f"{where}: metrics")
    curves = obj.get("curves", {})
    try:
        curves = {str(k): [(int(s), float(v)) for s, v in pts] for k, pts in curves.items()}
    except (TypeError, ValueError, AttributeError):
        raise QbenchError("curves must map names to [[epoch, value], ...]", f"{where}: curves") from None
    artifacts = obj.get("artifacts", {})
    if not isinstance(artifacts, dict):
        raise QbenchError("artifacts must be a mapping", f"{where}: artifacts")
    run = Run(
        run_id=obj["run_id"],
        experiment=obj["experiment"],
        experiment_id="bundle",
        name=obj["name"],
        status=obj["status"],
        tags=tags,
        params=params,
        metrics={k: float(v) for k, v in metrics.items()},
        start_time=obj.get("start_time") if isinstance(obj.get("start_time"), int) else None,
        end_time=obj.get("end_time") if isinstance(obj.get("end_time"), int) else None,
        curves=curves,
        artifacts=artifacts,
        source="bundle",
        checkpoint_sha256=sha if isinstance(sha := obj.get("checkpoint_sha256"), str) else None,
    )
    if run.cell_id != path.stem or path.parent.name != safe_folder_name(run.experiment):
        raise QbenchError(f"the file's place does not match its run (cell {run.cell_id!r})", where)
    return run


def load_bundle(bundle: Path | str | None = DEFAULT) -> list[Run]:
    """Every run of the bundle ``bundle`` (see :func:`resolve_bundle`; none when the folder
    does not exist)."""
    root = resolve_bundle(bundle)
    if root is None or not root.is_dir():
        return []
    runs = []
    for path in sorted(Path(root).glob("*/*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QbenchError(f"unreadable results-bundle file ({type(e).__name__})", str(path)) from None
        runs.append(_run_from(obj, path))
    assign_groups(runs)
    return runs


def merge(store_runs: list[Run], bundled: list[Run]) -> list[Run]:
    """The user's runs, then every bundled run whose cell the store does not hold."""
    have = {(r.experiment, r.cell_id) for r in store_runs}
    return store_runs + [r for r in bundled if (r.experiment, r.cell_id) not in have]


def bundle_from_store(src_uri: str, bundle: Path) -> tuple[int, int, int]:
    """Write every finished or failed run of the store ``src_uri`` into ``bundle``, with the
    SHA-256 of its checkpoint where the store holds it inside its own artifact folders.
    Returns (written, unchanged, without a checkpoint)."""
    from mlflow.tracking import MlflowClient
    from qbench.harness.evaluate import sha256
    from qbench.harness.transfer import confined_artifact

    from .runs import fetch_runs

    client = MlflowClient(tracking_uri=src_uri)
    pairs, missing = [], 0
    for run in fetch_runs(src_uri, details=True):
        ckpt = confined_artifact(src_uri, client.get_run(run.run_id).info.artifact_uri, CHECKPOINT)
        missing += ckpt is None
        pairs.append((run, sha256(ckpt) if ckpt is not None else None))
    written, unchanged = write_bundle(pairs, bundle)
    return written, unchanged, missing
