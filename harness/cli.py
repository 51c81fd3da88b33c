"""The ``qbench`` command line."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path

import click

from .errors import QbenchError

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "suites" / "smoke.yaml"
DEFAULT_OUT = "qbench-out"


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QbenchError as e:
            click.echo(f"qbench: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main)
            click.echo(
                "qbench: interrupted; the unfinished cell is marked killed: run the same command to resume", err=True
            )
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qbench")
def cli() -> None:
    """qbench: a benchmark leaderboard and reproducibility harness for quantization."""


def out_option(f):
    return click.option(
        "--out",
        "out",
        default=DEFAULT_OUT,
        show_default=True,
        type=click.Path(file_okay=False),
        help="Output folder: MLflow store, cell checkpoints, leaderboard site.",
    )(f)


def tracking_option(f):
    return click.option(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db).",
    )(f)


@cli.command("list")
@click.argument("what", type=click.Choice(["methods", "models", "datasets"]))
def list_cmd(what: str) -> None:
    """List the registered methods (with their papers), models or datasets."""
    if what == "methods":
        from qbench.methods import METHODS

        for name, cls in METHODS.items():  # a plugin that fails to import: one warning line
            paper = cls.paper.cite() if cls.paper and cls.paper.year else "-"
            click.echo(f"{name:14s} v{cls.version}  {paper}")
    elif what == "models":
        from .models import MODELS

        for name, fn in MODELS.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            click.echo(f"{name:18s} {doc[0] if doc else ''}")
    else:
        from .data import DATASETS

        for name, fn in DATASETS.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            click.echo(f"{name:18s} {doc[0] if doc else ''}")


def writable_folder(out: Path) -> None:
    """Create ``out`` and check that files can be written in it, or a one-line QbenchError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".qbench-write-check-"):
            pass
    except OSError as e:
        raise QbenchError(
            f"cannot write to the output folder ({e.strerror or e}); choose another --out", str(out)
        ) from None


@contextlib.contextmanager
def out_lock(out: Path):
    """One ``qbench run`` per output folder at a time: a second one is refused at once
    (it would train every cell again beside the first)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = out / ".qbench-run.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise QbenchError(
                f"another qbench run ({holder}) is using this output folder; wait for it or use another --out",
                str(out),
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _ctx(out: str, tracking_uri: str | None, data_root: str | None, force: bool = False):
    from .runner import RunContext
    from .tracking import default_uri

    outp = Path(out)
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        from .tracking import probe_server

        probe_server(tracking_uri)  # a server that is down: one line in seconds, before anything else
    return RunContext(
        out_dir=outp.resolve(), tracking_uri=tracking_uri or default_uri(outp), data_root=data_root, force=force
    )


def _statuses(suite, ctx) -> dict:
    """Cell id -> status read from the tracking store (an absent store: all pending)."""
    if ctx.tracking_uri.startswith("sqlite:///") and not Path(ctx.tracking_uri[len("sqlite:///") :]).exists():
        return {}
    return {cid: rec for cid, rec in ctx.tracker().runs().items()}


def _status(rec) -> str:
    """done, failed, pending, running (a live process works on it) or killed (its process
    on this machine is gone: the next run resumes it)."""
    if rec is None:
        return "pending"
    if rec.status == "running":
        from .tracking import process_alive

        return "killed" if process_alive(rec.tags) is False else "running"
    return rec.status


@cli.command()
@click.argument("suite", required=False, type=click.Path(dir_okay=False))
@out_option
@tracking_option
@click.option("--data-root", default=None, type=click.Path(file_okay=False), help="Folder holding the datasets.")
@click.option("--dry-run", is_flag=True, help="Print the plan and run nothing.")
@click.option("--force", is_flag=True, help="Rerun cells that already finished.")
@click.option(
    "--device",
    "devices",
    default=None,
    help="Comma-separated devices (cpu, cuda:0, ...); default: every visible GPU, else the CPU.",
)
@click.option("--no-leaderboard", is_flag=True, help="Do not rebuild the leaderboard site at the end.")
@click.option(
    "--executor",
    type=click.Choice(["local", "dask", "slurm", "pbs"]),
    default="local",
    show_default=True,
    help="Where cells run: this machine; a Dask cluster (--scheduler, else one started here); "
    "Slurm or PBS jobs (dask-jobqueue).",
)
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler (tcp://host:8786).")
@click.option(
    "--workers",
    type=click.IntRange(1, 4096),
    default=None,
    help="Workers to start: CPU worker processes (--executor dask) or jobs (slurm, pbs).",
)
def run(
    suite, out, tracking_uri, data_root, dry_run, force, devices, no_leaderboard, executor, scheduler, workers
) -> None:
    """Run SUITE (default: suites/smoke.yaml, the embedded digits suite)."""
    from .plan import check_devices, cpu_warning, estimate, human
    from .suite import load_suite

    make_executor = _executor(executor, scheduler, workers, devices)
    ctx = _ctx(out, tracking_uri, data_root, force)
    s = load_suite(suite or DEFAULT_SUITE)  # validates everything before anything runs
    device_list = check_devices(devices.split(",")) if devices else None
    status = _statuses(s, ctx)
    pending = [c for c in s.cells if force or _status(status.get(c.id)) != "done"]
    if dry_run:
        dev = (device_list or ["cuda:0" if torch_cuda() else "cpu"])[0]
        click.echo(
            f"suite {s.name}: {len(s.cells)} cells (parents first); estimating on {dev} from one timed step each"
        )
        est = estimate(pending, data_root, dev)  # loads each dataset: a missing one is an error here
        for c in s.cells:
            st = _status(status.get(c.id))
            action = "skip (done)" if c not in pending else ("resume" if st in ("killed", "running") else "run")
            parent = f" <- {c.parent}" if c.parent else ""
            epochs = c.recipe["epochs"] if c.recipe["train"] else 0
            t = f"~{human(est[c.id].seconds)}" if c.id in est else ""
            click.echo(f"  {c.id}  {action:11s} {c.label}  epochs={epochs} {t}{parent}")
        total = sum(e.seconds for e in est.values())
        unestimated = len(pending) - len(est)
        click.echo(
            f"{len(pending)} cells to run, about {human(total)} on one {dev} (one timed step per configuration)"
            if not unestimated
            else f"{len(pending)} cells to run; {len(est)} of them about {human(total)} on one {dev}, "
            f"{unestimated} not estimated (detection and segmentation cells are not timed ahead)"
        )
        return
    if pending and (device_list or ["cuda:0" if torch_cuda() else "cpu"])[0] == "cpu":
        warning = cpu_warning(pending, data_root)
        if warning:
            click.echo(f"qbench: warning: {warning}", err=True)
    from .progress import Reporter
    from .report import print_results

    writable_folder(ctx.out_dir)
    if executor != "local" and not ctx.tracking_uri.startswith(("http://", "https://")):
        click.echo(
            f"qbench: note: the workers write to {ctx.tracking_uri}; on several machines, start "
            "'qbench server' and pass --tracking-uri http://...",
            err=True,
        )
    with out_lock(ctx.out_dir):
        reporter = Reporter(len(s.cells))
        try:
            results = make_executor(device_list).run(s.cells, ctx, reporter)
        finally:
            reporter.close()
    print_results(s, results)
    if not no_leaderboard:
        from qbench.leaderboard.site import build_site

        site = build_site(ctx.tracking_uri, ctx.out_dir)
        click.echo(f"leaderboard: {site}")
    click.echo(f"MLflow store: {ctx.tracking_uri}  (browse: mlflow ui --backend-store-uri {ctx.tracking_uri})")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} cells failed:", err=True)
        for r in failed:
            click.echo(f"  {r.label}: {r.error}", err=True)
        sys.exit(1)


def _executor(kind: str, scheduler: str | None, workers: int | None, devices: str | None):
    """Check the executor options together; returns ``devices -> Executor`` (nothing starts yet)."""
    if scheduler and kind != "dask":
        raise QbenchError("--scheduler needs --executor dask", "--scheduler")
    if kind == "local":
        if workers:
            raise QbenchError(
                "--workers is for --executor dask, slurm or pbs (the local executor uses --device)", "--workers"
            )
        from .executor import LocalExecutor

        return LocalExecutor
    if devices:
        raise QbenchError(
            f"--device is for the local executor; --executor {kind} runs one cell per worker "
            "(pin a worker's GPU with CUDA_VISIBLE_DEVICES)",
            "--device",
        )
    if scheduler and workers:
        raise QbenchError("--workers starts a cluster here: leave it out with --scheduler", "--workers")
    if scheduler and not scheduler.startswith(("tcp://", "tls://", "ws://", "wss://", "inproc://", "ucx://")):
        scheduler = "tcp://" + scheduler
    from .dask_executor import DaskExecutor

    DaskExecutor.check(kind)  # dask / dask-jobqueue installed, before anything runs
    return lambda _devices: DaskExecutor(scheduler, "local" if kind == "dask" else kind, workers)


@cli.command()
@click.argument("suite", type=click.Path(dir_okay=False))
@out_option
@tracking_option
def show(suite, out, tracking_uri) -> None:
    """Print SUITE's expanded grid with each cell's status from the tracking store."""
    from .suite import load_suite

    ctx = _ctx(out, tracking_uri, None)
    s = load_suite(suite)
    status = _statuses(s, ctx)
    click.echo(f"suite {s.name}: {len(s.cells)} cells")
    from .report import TASK_METRIC

    head = f"{'cell id':16s}  {'status':8s} {'dataset':10s} {'model':16s} {'method':10s} {'bits':6s} seed  result"
    click.echo("  " + head)
    for c in s.cells:
        rec = status.get(c.id)
        st = _status(rec)
        key, label = TASK_METRIC.get(c.task, TASK_METRIC["classification"])
        value = f"{label} {rec.metrics[key]:.2f}" if rec and key in rec.metrics else ""
        click.echo(
            f"  {c.id:16s}  {st:8s} {c.dataset:10s} {c.model:16s} {c.method:10s} {c.bits_label:6s} {c.seed:4d}  {value}"
        )


@cli.command("import")
@click.argument("source")
@out_option
@tracking_option
@click.option(
    "--bundle",
    "bundle",
    default=None,
    type=click.Path(file_okay=False),
    help="Write the runs into this results bundle (e.g. results/) instead of the store.",
)
def import_cmd(source, out, tracking_uri, bundle) -> None:
    """Copy the runs of the MLflow store SOURCE (a tracking URI, or a folder holding
    mlflow.db, e.g. an --out folder brought back from a GPU machine) into this store, or
    (--bundle DIR) into a results bundle: one small JSON file per cell, for the repository.

    Local artifacts are copied only from inside SOURCE's own artifact folders (mlartifacts/
    or mlruns/ beside its mlflow.db); any that point elsewhere are skipped and named."""
    from .transfer import import_runs

    src = source
    if "://" not in source:
        db = Path(source) / "mlflow.db" if Path(source).is_dir() else Path(source)
        if not db.is_file():
            raise QbenchError("no MLflow store here (expected a tracking URI or a folder with mlflow.db)", source)
        src = f"sqlite:///{db.resolve()}"
    if bundle is not None:
        from qbench.leaderboard.bundle import bundle_from_store

        if tracking_uri:
            raise QbenchError("--bundle writes files, not a store: leave out --tracking-uri", "--bundle")
        written, unchanged, missing = bundle_from_store(src, Path(bundle))
        click.echo(
            f"bundled {written} runs from {src} into {bundle} ({unchanged} unchanged"
            + (f"; {missing} without a checkpoint in the store, so no checkpoint SHA-256" if missing else "")
            + ")"
        )
        return
    ctx = _ctx(out, tracking_uri, None)
    writable_folder(ctx.out_dir)
    copied, skipped, outside = import_runs(src, ctx.tracker())
    click.echo(f"imported {copied} runs from {src} ({skipped} already here); store: {ctx.tracking_uri}")
    if outside:  # artifact locations of the source that point out of it: not followed
        more = f"; and {len(outside) - 5} more" if len(outside) > 5 else ""
        click.echo(
            f"qbench: warning: skipped {len(outside)} artifacts outside the store: {'; '.join(outside[:5])}{more}",
            err=True,
        )


@cli.command()
@click.option(
    "--host",
    default="0.0.0.0",
    show_default=True,
    help="Interface to listen on (0.0.0.0: every machine that reaches this one; 127.0.0.1: this one only).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option(
    "--backend-store-uri",
    default="sqlite:///qbench-server/mlflow.db",
    show_default=True,
    help="Where runs are stored: an SQLAlchemy URI (sqlite:///..., postgresql://...) or an .db file path.",
)
@click.option(
    "--artifacts-destination",
    default="qbench-server/mlartifacts",
    show_default=True,
    help="Where the server keeps the runs' artifacts (checkpoints, JSON): a folder or an s3://... URI.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Server processes.")
@click.option(
    "--allowed-hosts",
    default=None,
    help="Host names clients may use in their URI (default: localhost, private IPs and this machine's names).",
)
def server(host, port, backend_store_uri, artifacts_destination, workers, allowed_hosts) -> None:
    """Start an MLflow tracking server that every worker of a cluster can write to.

    A thin wrapper over "mlflow server" that proxies artifacts (workers need no shared
    artifact folder); prints the --tracking-uri to pass to "qbench run"."""
    from .server import server_command

    argv, uri = server_command(host, port, backend_store_uri, artifacts_destination, workers, allowed_hosts)
    click.echo(f"MLflow server: use --tracking-uri {uri}", err=False)
    click.echo("  (no authentication: anyone who reaches this port can read and write runs)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # the server replaces this process: signals reach it directly


# --- commands from other modules are added here (one line each) -----------------------
from qbench.leaderboard.cli import leaderboard_cmd  # noqa: E402  (cheap: click only)

cli.add_command(leaderboard_cmd)
cli.add_command(__import__("qbench.leaderboard.verify", fromlist=["verify_cmd"]).verify_cmd)
cli.add_command(__import__("qbench.harness.bench", fromlist=["bench"]).bench)  # torch loads lazily
cli.add_command(__import__("qbench.harness.evaluate", fromlist=["evaluate_cmd"]).evaluate_cmd)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: checkpoint kept, run marked killed


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    cli()


if __name__ == "__main__":
    main()
