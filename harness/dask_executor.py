"""Cells as Dask tasks: on a cluster started by hand (``dask scheduler`` / ``dask worker``),
a LocalCluster on this machine (one worker per visible GPU, or N CPU workers), or an HPC
queue through dask-jobqueue (Slurm, PBS).

A cell is one task; a child task takes its parent's result as an argument, so Dask runs it
after the parent, and a child whose parent failed is recorded as failed without running.
Where workers declare a ``GPU`` resource (``dask worker ... --resources GPU=1``) each cell
asks for one, so one cell runs per GPU; a worker trains on its first visible GPU
(``CUDA_VISIBLE_DEVICES`` pins it), or on the device named by ``QBENCH_DEVICE``. A
``gpus: N`` cell asks for N and trains on its worker's first N visible GPUs (a worker
started with ``--resources GPU=N`` that sees them; :mod:`qbench.harness.ddp`); one that no
worker can hold fails at once instead of waiting forever.

Failures: a failing cell is a result, never an exception, so it never takes the suite
down. A worker that dies mid-cell (killed, out of memory, preempted) loses its task and
Dask runs it on another worker; the runner finds the cell's RUNNING or KILLED MLflow run
and resumes it from its last epoch checkpoint, so each cell keeps exactly one run. That
needs the output folder (checkpoints) on a filesystem every worker reads, and a tracking
store every worker reaches (``qbench server``). SIGTERM/SIGINT to a worker marks its cell
KILLED before the worker ends (:class:`CellSignals`); Ctrl-C on ``qbench run`` stops this
suite's cells on every worker the same way.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from dataclasses import replace

from . import signals
from .errors import QbenchError
from .executor import Executor, _blocked, _summary
from .progress import Reporter
from .runner import CellResult, RunContext, run_cell
from .suite import Cell

#: how often a cell whose task raised (not a failing cell: that is a result) is tried again
RETRIES = 2
#: seconds ``qbench run --scheduler`` waits for the first worker to connect
WORKER_WAIT_S = 60.0
#: seconds to reach the scheduler
CONNECT_S = 10.0
_PLUGIN = "qbench-cells"
#: imported by the workers of a cluster started here as they start (torch, MLflow), while
#: this process reads the store, rather than by their first cell (scikit-learn: the digits)
_PRELOAD = ["qbench.harness.runner", "mlflow", "sklearn.datasets"]


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise QbenchError(
            "the Dask executor needs dask and distributed: pip install 'dask[distributed]'", "--executor"
        ) from None
    return distributed


def _import_jobqueue(kind: str):
    try:
        import dask_jobqueue
    except ImportError:
        raise QbenchError(
            f"--executor {kind} needs dask-jobqueue: pip install 'qbench[cluster]' (or dask-jobqueue)", "--executor"
        ) from None
    return dask_jobqueue


class CellInterrupted(Exception):
    """A cell stopped by a signal on its worker; its run is KILLED and Dask tries it again."""


try:  # distributed is imported only when a Dask executor is asked for
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover
    WorkerPlugin = object


class CellSignals(WorkerPlugin):
    """Worker plugin: SIGTERM/SIGINT on the worker stop its cells (runs marked KILLED, the
    last epoch checkpoint kept) before the worker ends, and so does the worker closing."""

    idempotent = True
    name = _PLUGIN

    def setup(self, worker) -> None:
        self.handlers = signals.StopOnSignal()
        self.handlers.install()  # the worker's main thread (its event loop); else no-op

    def teardown(self, worker) -> None:
        if signals.interrupt():
            signals.wait_stopped(timeout=20.0)
        self.handlers.uninstall()


def worker_device() -> str:
    """The device a worker trains on: ``QBENCH_DEVICE``, else its first visible GPU, else the CPU."""
    import torch

    dev = os.environ.get("QBENCH_DEVICE")
    if dev:
        return dev
    return "cuda:0" if torch.cuda.is_available() and torch.cuda.device_count() else "cpu"


def run_cell_task(cell: Cell, ctx: RunContext, token: str, parent: CellResult | None = None) -> CellResult:
    """The task: run ``cell`` on this worker (after its parent, whose result is ``parent``)."""
    if parent is not None:
        blocked = _blocked(cell, {parent.cell_id: parent})
        if blocked:
            return blocked
    import torch
    from distributed import get_worker

    from .plan import cpu_threads

    worker = get_worker()
    ctx = replace(ctx, device=worker_device())
    if ctx.device != "cpu" and cell.typed_recipe.gpus > 1:
        ctx = replace(ctx, devices=tuple(f"cuda:{i}" for i in range(torch.cuda.device_count())))
    if ctx.device == "cpu":
        cpu_threads()
    else:
        torch.cuda.set_device(torch.device(ctx.device))
    topic = f"qbench-{token}"

    def report(kind: str, **kw) -> None:
        if signals.stop_requested():
            raise KeyboardInterrupt  # at the latest at an epoch's end, after its checkpoint
        try:
            worker.log_event(topic, {"kind": kind, **kw})
        except Exception:
            pass  # progress is best effort

    report("cell_start", label=f"{cell.label} on {worker.name}")
    with signals.interruptible(token):
        try:
            return run_cell(cell, ctx, None, report)
        except KeyboardInterrupt:  # a signal on this worker, or the client cancelled: its run is KILLED
            raise CellInterrupted(
                f"{cell.label} was interrupted on {worker.address}; its run is marked killed"
            ) from None


def _store_state(cells: list[Cell], ctx: RunContext) -> dict:
    """The store's runs by cell id; creates the suite's experiment once, here, rather than
    raced by the workers."""
    tracker = ctx.tracker()
    if cells:
        tracker.experiment_id(cells[0].suite)
    return tracker.runs()


async def stop_cells(token: str, timeout: float = 20.0) -> int:
    """On a worker (``client.run``): stop the cells of suite run ``token``; returns how many."""
    import asyncio

    n = signals.interrupt(token)
    loop = asyncio.get_running_loop()
    if n:
        await loop.run_in_executor(None, signals.wait_stopped, token, timeout)
    return n


class DaskExecutor(Executor):
    """Run the cells as tasks of a Dask cluster.

    ``scheduler``: the address of a running scheduler (``tcp://host:8786``); ``None``
    starts a cluster here: ``kind='local'`` (one worker per visible GPU, or ``workers``
    CPU workers), ``'slurm'`` or ``'pbs'`` (dask-jobqueue, configured in the Dask config
    ``jobqueue.*``; ``workers`` jobs)."""

    def __init__(self, scheduler: str | None = None, kind: str = "local", workers: int | None = None):
        self.check(kind)
        self.scheduler = scheduler
        self.kind = kind
        self.workers = workers

    @staticmethod
    def check(kind: str) -> None:
        """A one-line QbenchError unless what ``kind`` needs is installed."""
        _import_distributed()
        if kind in ("slurm", "pbs"):
            _import_jobqueue(kind)

    # --- the cluster -------------------------------------------------------------------
    def _cluster(self):
        if self.kind in ("slurm", "pbs"):
            return self._jobqueue_cluster()
        import torch
        from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

        quiet = {"silence_logs": 40, "dashboard_address": ":0"}  # any free port: never 'port in use'
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus and not self.workers:
            # one worker process per GPU, each seeing only its own (so each trains on cuda:0)
            workers = {
                f"gpu{i}": {
                    "cls": Nanny,
                    "options": {
                        "nthreads": 1,
                        "resources": {"GPU": 1},
                        "env": {"CUDA_VISIBLE_DEVICES": str(i)},
                        "preload": _PRELOAD,
                        "silence_logs": 40,
                    },
                }
                for i in range(n_gpus)
            }
            scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
            return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)
        n = self.workers or min(os.cpu_count() or 1, 8)
        env = {"CUDA_VISIBLE_DEVICES": ""} if n_gpus else {}  # --workers N: N CPU workers
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, env=env, preload=_PRELOAD, **quiet)

    def _jobqueue_cluster(self):
        dask_jobqueue = _import_jobqueue(self.kind)
        cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[self.kind]
        try:
            cluster = cls()  # cores, memory, queue, GPUs...: the Dask config's jobqueue.<kind> section
        except ValueError as e:  # e.g. no cores or memory configured
            raise QbenchError(
                f"{e} (set them in ~/.config/dask/jobqueue.yaml under jobqueue.{self.kind}; see README)", "--executor"
            ) from None
        cluster.scale(jobs=self.workers or 1)
        return cluster

    def _connect(self):
        from distributed import Client

        if self.scheduler:
            try:
                return Client(self.scheduler, timeout=CONNECT_S), None
            except OSError as e:
                raise QbenchError(f"cannot reach the Dask scheduler ({e})", self.scheduler) from None
        cluster = self._cluster()
        return Client(cluster), cluster

    # --- running ------------------------------------------------------------------------
    def run(self, cells: list[Cell], ctx: RunContext, reporter: Reporter) -> list[CellResult]:
        from concurrent.futures import ThreadPoolExecutor

        if self.scheduler:  # a scheduler that is not there: one line, and nothing written
            client, cluster = self._connect()
            store = None
        else:  # read the store while the workers start (each a few seconds of imports)
            pool = ThreadPoolExecutor(1)
            store = pool.submit(_store_state, cells, ctx)
            pool.shutdown(wait=False)
            client, cluster = self._connect()
        try:
            runs = store.result() if store is not None else _store_state(cells, ctx)
            if self.kind in ("slurm", "pbs"):
                reporter.console.print(f"qbench: waiting for the first {self.kind} job to start a worker")
            try:
                client.wait_for_workers(1, timeout=None if self.kind in ("slurm", "pbs") else WORKER_WAIT_S)
            except TimeoutError:
                raise QbenchError(
                    f"no Dask worker connected within {WORKER_WAIT_S:.0f} s; start one with "
                    f"'dask worker {self.scheduler} --nthreads 1' (add --resources GPU=1 on a GPU)",
                    self.scheduler or "--executor",
                ) from None
            client.register_plugin(CellSignals(), name=_PLUGIN)
            return self._run(client, cells, ctx, reporter, runs)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def _run(self, client, cells: list[Cell], ctx: RunContext, reporter: Reporter, runs: dict) -> list[CellResult]:
        from distributed import as_completed

        token = uuid.uuid4().hex
        workers = client.scheduler_info()["workers"].values()
        gpus = [(w.get("resources") or {}).get("GPU") for w in workers]
        most = max((g for g in gpus if g is not None), default=None)  # None: workers declare no GPUs
        events: queue.Queue = queue.Queue()
        client.subscribe_topic(f"qbench-{token}", lambda ev: events.put(("event", ev[1])))

        results: dict[str, CellResult] = {}
        futures: dict[str, object] = {}  # cell id -> future
        of_key: dict[str, Cell] = {}
        for cell in cells:  # parents first
            rec = runs.get(cell.id)
            if rec and rec.status == "done" and not ctx.force:  # finished: nothing to send anywhere
                results[cell.id] = CellResult(cell.id, cell.label, "skipped", rec.metrics, run_id=rec.run_id)
                reporter.cell_start(cell.label)
                reporter.cell_end(cell.label, "skipped")
                continue
            need = cell.typed_recipe.gpus
            if most is not None and need > most:  # no worker could ever take it
                error = f"recipe gpus: {need} needs a worker with --resources GPU={need}; the largest has GPU={most:g}"
                results[cell.id] = CellResult(cell.id, cell.label, "failed", error=error)
                reporter.cell_start(cell.label)
                reporter.cell_end(cell.label, "failed", error)
                continue
            resources = {"GPU": need} if most is not None else None
            parent = futures[cell.parent] if cell.parent in futures else results.get(cell.parent)
            key = f"qbench-cell-{cell.id}-{token[:8]}"
            fut = client.submit(
                run_cell_task, cell, ctx, token, parent, key=key, resources=resources, retries=RETRIES, pure=False
            )
            futures[cell.id] = fut
            of_key[key] = cell

        def completions() -> None:
            for fut in as_completed(list(futures.values())):
                events.put(("done", fut))

        threading.Thread(target=completions, daemon=True, name="qbench-dask-results").start()
        try:
            while len(results) < len(cells):
                kind, payload = events.get()
                if kind == "event":
                    self._event(payload, reporter)
                    continue
                cell = of_key[payload.key]
                res = self._result(cell, payload, futures)
                results[cell.id] = res
                reporter.cell_end(cell.label, res.status, res.error or _summary(res))
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM here: stop this suite's cells everywhere
            client.cancel(list(futures.values()), force=True)
            stopper = threading.Thread(target=client.run, args=(stop_cells, token), kwargs={"on_error": "ignore"})
            stopper.daemon = True
            stopper.start()
            stopper.join(25.0)  # an unresponsive worker must not hold Ctrl-C forever
            raise
        return [results[c.id] for c in cells]

    @staticmethod
    def _event(msg: dict, reporter: Reporter) -> None:
        msg = dict(msg)
        kind = msg.pop("kind", "")
        if kind == "cell_start":
            reporter.cell_start(msg.get("label", ""))
        elif kind:
            reporter.event(kind, **msg)

    @staticmethod
    def _result(cell: Cell, fut, futures: dict) -> CellResult:
        if fut.status == "finished":
            return fut.result()
        parent = futures.get(cell.parent) if cell.parent else None
        if parent is not None and parent.status in ("error", "cancelled"):
            return CellResult(cell.id, cell.label, "failed", error=f"parent cell {cell.parent} failed")
        if fut.status == "cancelled":
            return CellResult(cell.id, cell.label, "failed", error="cancelled")
        exc = fut.exception()
        return CellResult(cell.id, cell.label, "failed", error=f"{type(exc).__name__}: {exc}")
