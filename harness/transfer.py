"""Copy runs from one MLflow store into another (``qbench import``).

Runs made elsewhere (a GPU machine, a colleague's store) come back as a whole store; this
merges their runs into the local one, experiment by experiment, with their tags, params,
full metric histories, artifacts, names, times and status, so the leaderboard shows them
beside the local runs. A cell whose finished run is already in the destination is not
copied again, so importing twice changes nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import QbenchError
from .tracking import CELL_ID, STATUS, Tracker


def import_runs(src_uri: str, dst: Tracker) -> tuple[int, int]:
    """Copy every active run of ``src_uri`` into ``dst``; returns (copied, skipped)."""
    from mlflow.entities import Metric, Param, RunTag, ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    src = MlflowClient(tracking_uri=src_uri)
    try:
        exps = src.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    except MlflowException as e:
        raise QbenchError(f"cannot read the MLflow store: {e}", src_uri) from None
    have = dst.runs()
    copied = skipped = 0
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
                for art in src.list_artifacts(run.info.run_id):
                    local = src.download_artifacts(run.info.run_id, art.path, d)
                    if Path(local).is_dir():
                        dst.client.log_artifacts(rid, local, art.path)
                    else:
                        parent = str(Path(art.path).parent)
                        dst.client.log_artifact(rid, local, None if parent == "." else parent)
            status = run.info.status if run.info.status in ("FINISHED", "FAILED", "KILLED") else "KILLED"
            dst.client.set_terminated(rid, status=status, end_time=run.info.end_time)
            if tags.get(STATUS) == "running":  # an unfinished cell stays unfinished here too
                dst.client.set_tag(rid, STATUS, "running")
            copied += 1
    return copied, skipped
