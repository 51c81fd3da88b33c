"""Copy runs from one MLflow store into another (``qbench import``).

Runs made elsewhere (a GPU machine, a colleague's store) come back as a whole store; this
merges their runs into the local one, experiment by experiment, with their tags, params,
full metric histories, artifacts, names, times and status, so the leaderboard shows them
beside the local runs. A cell whose finished run is already in the destination is not
copied again, so importing twice changes nothing.

A store someone sent you chooses its runs' artifact locations, so they are not followed
blindly: artifacts on this machine's disk (``file:`` URIs and plain paths) are copied only
from inside the source store's own artifact folders (:func:`artifact_roots`: for a sqlite
store, the ``mlartifacts`` and ``mlruns`` folders beside its database), with symlinks
resolved; everything else is refused and named in the result, including, for a store on
this disk, artifact URIs of any other scheme (``s3:``, ``http:``: a store you were sent
holds its artifacts). Artifacts of an ``http(s)`` store (its ``mlflow-artifacts:`` URIs,
or an object store it names) come through MLflow as before; only local paths are
confined. Experiment names choose no path either: the destination's
:meth:`~qbench.harness.tracking.Tracker.experiment_id` derives the folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from .errors import QbenchError
from .tracking import CELL_ID, STATUS, Tracker

#: the folders beside a sqlite database that hold its artifacts (qbench's ``--out`` layout,
#: and MLflow's default)
ARTIFACT_FOLDERS = ("mlartifacts", "mlruns")


class Imported(NamedTuple):
    copied: int  # runs copied
    skipped: int  # runs already here
    outside: list[str]  # artifacts not copied because they lie outside the source store


def artifact_roots(src_uri: str) -> list[Path]:
    """The local folders (real paths) the artifacts of the store ``src_uri`` may come from:
    ``<folder of the database>/mlartifacts`` and ``/mlruns`` for ``sqlite:///``, the folder
    itself for a ``file:`` store, none for anything else (a server's artifacts come through
    its API). A root that is itself a symlink is not one."""
    scheme = urlparse(src_uri).scheme
    if scheme == "sqlite":
        db = src_uri[len("sqlite:///") :].split("?", 1)[0] if src_uri.startswith("sqlite:///") else ""
        if db in ("", ":memory:"):
            return []
        base = Path(os.path.realpath(db)).parent
        candidates = [base / name for name in ARTIFACT_FOLDERS]
    elif scheme in ("", "file"):
        candidates = [Path(os.path.realpath(_local_path(src_uri) or ""))]
    else:
        return []
    return [c for c in candidates if not c.is_symlink()]


def _local_path(uri: str) -> str | None:
    """The path of a ``file:`` URI or a plain path; ``None`` for any other scheme."""
    scheme = urlparse(uri).scheme
    if scheme == "file":
        from mlflow.utils.file_utils import local_file_uri_to_path

        return local_file_uri_to_path(uri)
    return uri if scheme == "" else None


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def confined_artifact(src_uri: str, artifact_uri: str, relative: str) -> Path | None:
    """The local file ``relative`` under a run's ``artifact_uri`` in the store ``src_uri``
    when it lies inside the store's own artifact folders (symlinks resolved) and exists;
    None otherwise (a server's artifacts, a path the store points elsewhere)."""
    folder = _local_path(artifact_uri)
    if folder is None:
        return None
    path = Path(os.path.realpath(Path(folder) / relative))
    return path if _inside(path, artifact_roots(src_uri)) and path.is_file() else None


def _stage_local(folder: str, roots: list[Path], stage: Path, label: str, outside: list[str]) -> None:
    """Copy the files under the artifact folder ``folder`` into ``stage`` (same relative
    paths) when they lie inside ``roots`` once every symlink is resolved; name the rest in
    ``outside``. Nothing outside the roots is read, only its path resolved."""
    real = Path(os.path.realpath(folder))
    if not _inside(real, roots):
        outside.append(f"{label}: {folder}")
        return
    if not real.is_dir():
        return  # nothing logged

    def walk(d: Path, rel: Path, chain: frozenset[Path]) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            target = Path(os.path.realpath(entry.path))
            r = rel / entry.name
            if not _inside(target, roots):
                outside.append(f"{label}: {r.as_posix()} -> {target}")
            elif target.is_dir():
                if target not in chain:  # a symlink back up the tree: once is enough
                    walk(target, r, chain | {target})
            elif target.is_file():  # not a fifo, socket or device
                (stage / r).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target, stage / r)

    walk(real, Path(), frozenset({real}))


def import_runs(src_uri: str, dst: Tracker, roots: list[Path] | None = None) -> Imported:
    """Copy every active run of ``src_uri`` into ``dst``; returns the number of runs copied,
    the number already here, and the artifacts refused for lying outside ``roots`` (default
    :func:`artifact_roots` of ``src_uri``)."""
    from mlflow.entities import Metric, Param, RunTag, ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    roots = artifact_roots(src_uri) if roots is None else [Path(os.path.realpath(r)) for r in roots]
    local_store = urlparse(src_uri).scheme in ("sqlite", "file", "")
    src = MlflowClient(tracking_uri=src_uri)
    try:
        exps = src.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    except MlflowException as e:
        raise QbenchError(f"cannot read the MLflow store: {e}", src_uri) from None
    have = dst.runs()
    copied = skipped = 0
    outside: list[str] = []
    for exp in exps:
        for run in src.search_runs([exp.experiment_id], max_results=50000):
            tags = dict(run.data.tags)
            cid = tags.get(CELL_ID)
            # skip what is here already, unless this copy finished and the local one did not
            if cid and cid in have and (have[cid].status == "done" or tags.get(STATUS) != "done"):
                skipped += 1
                continue
            new = dst.client.create_run(
                dst.experiment_id(exp.name), start_time=run.info.start_time, run_name=run.info.run_name
            )
            rid = new.info.run_id
            metrics = []
            for key in run.data.metrics:
                history = src.get_metric_history(run.info.run_id, key)
                metrics += [Metric(m.key, m.value, m.timestamp, m.step) for m in history]
            dst.client.log_batch(
                rid,
                params=[Param(k, v) for k, v in run.data.params.items()],
                tags=[
                    RunTag(k, v)
                    for k, v in tags.items()
                    if not k.startswith("mlflow.") or k in ("mlflow.runName", "mlflow.note.content")
                ],
            )
            for i in range(0, len(metrics), 1000):
                dst.client.log_batch(rid, metrics=metrics[i : i + 1000])
            with tempfile.TemporaryDirectory() as d:
                label = run.info.run_name or run.info.run_id
                local = _local_path(run.info.artifact_uri)
                if local is not None:  # on this disk: only from inside the source store
                    stage = Path(d) / "stage"
                    stage.mkdir()
                    _stage_local(local, roots, stage, label, outside)
                    if any(stage.iterdir()):
                        dst.client.log_artifacts(rid, str(stage))
                elif local_store:  # a store on this disk whose run points at a remote location
                    outside.append(f"{label}: {run.info.artifact_uri}")
                else:  # behind a server (mlflow-artifacts:) or in an object store it names
                    for art in src.list_artifacts(run.info.run_id):
                        got = src.download_artifacts(run.info.run_id, art.path, d)
                        if Path(got).is_dir():
                            dst.client.log_artifacts(rid, got, art.path)
                        else:
                            parent = str(Path(art.path).parent)
                            dst.client.log_artifact(rid, got, None if parent == "." else parent)
            status = run.info.status if run.info.status in ("FINISHED", "FAILED", "KILLED") else "KILLED"
            dst.client.set_terminated(rid, status=status, end_time=run.info.end_time)
            if tags.get(STATUS) == "running":  # an unfinished cell stays unfinished here too
                dst.client.set_tag(rid, STATUS, "running")
            copied += 1
    return Imported(copied, skipped, outside)
