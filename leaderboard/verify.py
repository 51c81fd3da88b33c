"""``qbench verify RUN``: score a run's checkpoint again, on the same data and settings, and
say whether it gives the logged top-1 to the image.

RUN is a run id or a cell id, looked up in the store, then in the results bundle. The
checkpoint is the run's ``checkpoint/model.pt`` (read from the store's own artifact folders
only, with ``weights_only=True``), or ``--checkpoint FILE`` (a bundled run's, whose SHA-256
must be the one the bundle recorded). The model, method, bits, options and data come from
the run's ``config.json``; the data must be the ones the run read (its
``qbench.data_fingerprint``, where it has one); the evaluation is
:func:`qbench.harness.evaluate.evaluate_checkpoint` without recording. PASS when the number
of correctly classified images equals the logged one; FAIL names the difference (images and
points), exit status 1.

``qbench verify --retrain RUN`` trains the cell again from its logged ``config.json`` (and
its parents', found by cell id in the store or the bundle: a quantized cell's full-precision
model is trained again too), in a temporary store unless ``--retrain-out`` names one, and
says whether the new top-1 falls within the seeds' spread: the range of the final top-1 of
the runs of the cell's group (every seed of the same configuration), widened by the cell's
tolerance (points). PASS exit 0, FAIL exit 1.

Runs trained on a GPU evaluated there under bf16 autocast; scored again on a CPU in float32
they can differ by a few images on rounding boundaries: verify them on the kind of machine
that made them (the run's ``environment.json`` says which).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
from qbench.harness.errors import QbenchError

from .runs import Run


@dataclass
class Verdict:
    ok: bool
    logged_top1: float
    top1: float
    n_images: int
    logged_correct: int
    correct: int
    data_differs: str = ""  # the two fingerprints when the data are not the run's

    def line(self, run: Run) -> str:
        what = f"{run.name} ({run.run_id})"
        if self.data_differs:
            return f"FAIL {what}: not the data the run read ({self.data_differs})"
        if self.ok:
            return (
                f"PASS {what}: top-1 {self.top1:.2f}% = logged {self.logged_top1:.2f}% "
                f"({self.correct:,} of {self.n_images:,} images)"
            )
        diff = self.correct - self.logged_correct
        return (
            f"FAIL {what}: top-1 {self.top1:.2f}%, logged {self.logged_top1:.2f}%: {diff:+d} images "
            f"({self.top1 - self.logged_top1:+.2f} points; {self.correct:,} vs {self.logged_correct:,} "
            f"of {self.n_images:,})"
        )


def find_run(key: str, tracking_uri: str, bundle) -> Run:
    """The run whose run id or cell id is ``key``: the store's first, then the bundle's."""
    from .bundle import load_bundle
    from .runs import _client, fetch_runs, load_details

    for runs in (fetch_runs(tracking_uri, details=False), load_bundle(bundle)):
        hits = [r for r in runs if key in (r.run_id, r.cell_id)]
        if len(hits) > 1:
            raise QbenchError(f"{len(hits)} runs match {key!r} (cell of several suites): pass the run id", "RUN")
        if hits:
            if hits[0].source == "store":  # the one run's curves and artifacts, not every run's
                load_details(_client(tracking_uri), hits[0])
            return hits[0]
    raise QbenchError("no finished or failed run with this run id or cell id in the store or the bundle", key)


def checkpoint_of(run: Run, tracking_uri: str, given: str | None, work: Path) -> Path:
    """The checkpoint to score: ``given`` (checked against the bundle's SHA-256 where it has
    one), else the run's artifact from the store's own folders (or its server)."""
    from qbench.harness.evaluate import sha256

    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise QbenchError("no such checkpoint file", given)
        if run.checkpoint_sha256 and sha256(path) != run.checkpoint_sha256:
            raise QbenchError(
                f"this file is not the run's checkpoint (SHA-256 {sha256(path)[:12]}..., "
                f"the bundle recorded {run.checkpoint_sha256[:12]}...)",
                given,
            )
        return path
    if run.source == "bundle":
        raise QbenchError("a bundled run: pass its checkpoint with --checkpoint FILE", run.run_id)
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient
    from qbench.harness.transfer import confined_artifact

    from .bundle import CHECKPOINT

    client = MlflowClient(tracking_uri=tracking_uri)
    if urlparse(tracking_uri).scheme in ("http", "https"):
        try:
            return Path(client.download_artifacts(run.run_id, CHECKPOINT, str(work)))
        except Exception as e:
            raise QbenchError(f"the run has no checkpoint on the server ({type(e).__name__})", run.run_id) from None
    path = confined_artifact(tracking_uri, client.get_run(run.run_id).info.artifact_uri, CHECKPOINT)
    if path is None:
        raise QbenchError("the run's checkpoint/model.pt is not in the store's artifact folders", run.run_id)
    return path


def verify_run(run: Run, checkpoint: Path, data_root: str | None = None, device: str | None = None) -> Verdict:
    """Score ``checkpoint`` as ``run`` was scored and compare with its logged top-1."""
    from qbench.harness.evaluate import evaluate_checkpoint

    cfg = run.artifacts.get("config.json")
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise QbenchError("the run has no config.json to rebuild its model from", run.run_id)
    logged, n_logged = run.metrics.get("top1"), run.metrics.get("n_images")
    if logged is None or not n_logged:
        raise QbenchError("the run logged no final top-1 (a failed run?)", run.run_id)
    recipe = cfg.get("recipe") or {}
    logged_data = run.tag("data_fingerprint")
    if logged_data:
        from qbench.harness.data import load_dataset

        data = load_dataset(cfg["dataset"], data_root, "dataset", **(cfg.get("dataset_options") or {}))
        if data.fingerprint() != logged_data:
            differs = f"data fingerprint {data.fingerprint()[:12]}..., the run's {logged_data[:12]}..."
            return Verdict(False, float(logged), float("nan"), 0, 0, 0, data_differs=differs)
    m = evaluate_checkpoint(
        checkpoint,
        model=cfg["model"],
        dataset=cfg["dataset"],
        method=cfg["method"],
        bits=f"W{cfg['w_bits']}A{cfg['a_bits']}",
        options=cfg.get("options") or {},
        model_options=cfg.get("model_options") or {},
        dataset_options=cfg.get("dataset_options") or {},
        data_root=data_root,
        batch_size=int(recipe.get("eval_batch_size", 500)),
        device=device,
        fmt="qbench",
        track=False,
    )
    n = int(m["n_images"])
    correct, logged_correct = round(m["top1"] * n / 100), round(logged * n_logged / 100)
    ok = n == int(n_logged) and correct == logged_correct
    return Verdict(ok, float(logged), float(m["top1"]), n, logged_correct, correct)


@dataclass
class Retrained:
    ok: bool
    top1: float
    seeds: list[float]  # the final top-1 of each run of the cell's group
    tolerance: float

    def line(self, run: Run) -> str:
        what = f"{run.name} ({run.cell_id})"
        if not self.seeds:
            return f"FAIL {what}: the retrained cell gave no top-1"
        lo, hi = min(self.seeds), max(self.seeds)
        mean = sum(self.seeds) / len(self.seeds)
        spread = f"seeds' range {lo:.2f}-{hi:.2f}% (mean {mean:.2f}%, n={len(self.seeds)}) +- {self.tolerance:g}"
        verdict = "within" if self.ok else "outside"
        return f"{'PASS' if self.ok else 'FAIL'} {what}: retrained top-1 {self.top1:.2f}% is {verdict} the {spread}"


def cell_of(run: Run):
    """The :class:`~qbench.harness.suite.Cell` the run's ``config.json`` describes; its id must
    be the run's cell id (a config edited by hand, or from another qbench, is refused)."""
    from dataclasses import fields

    from qbench.harness.suite import Cell

    cfg = run.artifacts.get("config.json")
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise QbenchError("the run has no config.json to rebuild its cell from", run.run_id)
    names = {f.name for f in fields(Cell)}
    try:
        cell = Cell(**{k: v for k, v in cfg.items() if k in names})
    except TypeError as e:
        raise QbenchError(f"config.json does not describe a cell ({e})", run.run_id) from None
    if cell.id != cfg.get("id"):
        raise QbenchError(f"config.json rebuilds cell {cell.id}, not the run's {cfg.get('id')}", run.run_id)
    return cell


def chain_of(run: Run, tracking_uri: str, bundle) -> list:
    """The run's cell and its ancestors (parents first), each rebuilt from its own run."""
    cells = [cell_of(run)]
    while cells[0].parent:
        parent = find_run(cells[0].parent, tracking_uri, bundle)
        cells.insert(0, cell_of(parent))
    return cells


def group_top1(run: Run, tracking_uri: str, bundle) -> list[float]:
    """The final top-1 of every finished run of the run's group (its seeds), store and bundle,
    one per cell (the store's where both hold it)."""
    from .bundle import load_bundle
    from .runs import fetch_runs

    group = run.tag("group")
    seen: dict[str, float] = {}
    for runs in (fetch_runs(tracking_uri, details=False), load_bundle(bundle)):
        for r in runs:
            if group and r.tag("group") == group and "top1" in r.metrics and r.cell_id not in seen:
                seen[r.cell_id] = float(r.metrics["top1"])
    if not seen and "top1" in run.metrics:
        seen[run.cell_id] = float(run.metrics["top1"])
    return list(seen.values())


def retrain_run(run: Run, tracking_uri: str, bundle, out: Path, data_root: str | None, device: str) -> Retrained:
    """Train the run's cell (and its parents) again into ``out`` and judge the new top-1."""
    from qbench.harness.executor import LocalExecutor
    from qbench.harness.progress import Reporter
    from qbench.harness.runner import RunContext
    from qbench.harness.tracking import default_uri

    cells = chain_of(run, tracking_uri, bundle)
    seeds = group_top1(run, tracking_uri, bundle)
    ctx = RunContext(out_dir=out.resolve(), tracking_uri=default_uri(out), data_root=data_root, force=True)
    reporter = Reporter(len(cells))
    try:
        results = LocalExecutor([device]).run(cells, ctx, reporter)
    finally:
        reporter.close()
    last = results[-1]
    if last.status != "done" or "top1" not in last.metrics:
        raise QbenchError(f"the retrained cell {last.status}: {last.error or 'no top-1'}", run.cell_id)
    top1 = float(last.metrics["top1"])
    tol = float(cells[-1].tolerance)
    ok = bool(seeds) and min(seeds) - tol <= top1 <= max(seeds) + tol
    return Retrained(ok, top1, seeds, tol)


@click.command("verify")
@click.argument("run_key", metavar="RUN")
@click.option("--out", default="qbench-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db).")
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(dir_okay=False),
    help="The checkpoint file (a bundled run's; default: the run's checkpoint in the store).",
)
@click.option("--bundle", default=None, type=click.Path(file_okay=False), help="Results bundle to look in.")
@click.option("--data-root", default=None, type=click.Path(file_okay=False))
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available).")
@click.option(
    "--retrain",
    is_flag=True,
    help="Train the cell again (and its parents) from its logged config; PASS if the new top-1 "
    "falls within the seeds' range of its group, widened by the cell's tolerance.",
)
@click.option(
    "--retrain-out",
    default=None,
    type=click.Path(file_okay=False),
    help="Where --retrain trains (its own store and checkpoints; default: a temporary folder).",
)
def verify_cmd(run_key, out, tracking_uri, checkpoint, bundle, data_root, device, retrain, retrain_out) -> None:
    """Score RUN's checkpoint again and confirm its logged top-1 to the image (exit 1 if not);
    with --retrain, train it again and compare with the seeds' spread."""
    from qbench.harness.tracking import Tracker, default_uri

    from .bundle import DEFAULT

    uri = tracking_uri or default_uri(out)
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///") :].split("?", 1)[0]).exists():
        Tracker(uri)  # a damaged store: one line, exit 2
    run = find_run(run_key, uri, Path(bundle) if bundle else DEFAULT)
    if retrain:
        if checkpoint:
            raise QbenchError("--retrain trains a new checkpoint: leave --checkpoint out", "--checkpoint")
        dev = device or ("cuda" if _cuda() else "cpu")
        bundle_dir = Path(bundle) if bundle else DEFAULT
        if retrain_out:
            result = retrain_run(run, uri, bundle_dir, Path(retrain_out), data_root, dev)
        else:
            with tempfile.TemporaryDirectory() as work:
                result = retrain_run(run, uri, bundle_dir, Path(work), data_root, dev)
        click.echo(result.line(run))
        if not result.ok:
            raise SystemExit(1)
        return
    with tempfile.TemporaryDirectory() as work:
        path = checkpoint_of(run, uri, checkpoint, Path(work))
        verdict = verify_run(run, path, data_root, device)
    click.echo(verdict.line(run))
    if not verdict.ok:
        raise SystemExit(1)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
