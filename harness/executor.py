"""Executors decide where cells run; the runner decides what a cell does.

An :class:`Executor` takes the plan (cells, parents first) and returns one
:class:`CellResult` per cell, never raising for a failing cell. A child whose parent
failed is recorded as failed without running. :class:`LocalExecutor` runs on this
machine: in this process on the CPU or a single GPU, or one worker process per device
(kept from cell to cell) for several. A ``gpus: N`` cell takes N free GPUs at once (on the
CPU: N processes; see :mod:`qbench.harness.ddp`). :mod:`qbench.harness.dask_executor` runs them on a Dask cluster.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import signal
from abc import ABC, abstractmethod

import torch

from .plan import cpu_threads
from .progress import Reporter
from .runner import CellResult, RunContext, run_cell
from .suite import Cell


class Executor(ABC):
    @abstractmethod
    def run(self, cells: list[Cell], ctx: RunContext, reporter: Reporter) -> list[CellResult]:
        """Run every cell (parents before children) and return their results."""


def _blocked(cell: Cell, results: dict[str, CellResult]) -> CellResult | None:
    """The failed result of ``cell`` when its parent failed (nothing runs), else None."""
    if cell.parent and cell.parent in results and results[cell.parent].status == "failed":
        return CellResult(cell.id, cell.label, "failed", error=f"parent cell {cell.parent} failed")
    return None


class LocalExecutor(Executor):
    """The CPU, or one worker process per visible GPU (``devices``)."""

    def __init__(self, devices: list[str] | None = None):
        if devices is None:
            n = torch.cuda.device_count()
            devices = [f"cuda:{i}" for i in range(n)] or ["cpu"]
        self.devices = devices

    def run(self, cells: list[Cell], ctx: RunContext, reporter: Reporter) -> list[CellResult]:
        runs = ctx.tracker().runs()
        if len(self.devices) == 1:
            ctx.device = self.devices[0]
            if ctx.device == "cpu":
                cpu_threads()
            results: dict[str, CellResult] = {}
            for cell in cells:
                reporter.cell_start(cell.label)
                res = _blocked(cell, results) or run_cell(cell, ctx, runs, reporter.event)
                results[cell.id] = res
                reporter.cell_end(cell.label, res.status, res.error or _summary(res))
            return [results[c.id] for c in cells]
        return self._run_pool(cells, ctx, reporter, runs)

    def _run_pool(self, cells, ctx, reporter, runs) -> list[CellResult]:
        spawn = mp.get_context("spawn")
        events = spawn.Queue()
        threads = worker_threads(len(self.devices))
        slots = [_Slot(d) for d in self.devices]
        results: dict[str, CellResult] = {}
        pending = list(cells)
        busy: dict[str, tuple] = {}  # cell id -> (the slots it holds, the first running it; the cell)
        ids = {x.id for x in cells}
        try:
            while pending or busy:
                while pending:
                    runnable = (c for c in pending if not c.parent or c.parent in results or c.parent not in ids)
                    ready = next(runnable, None)
                    if ready is None:
                        break
                    blocked = _blocked(ready, results)
                    if blocked:
                        pending.remove(ready)
                        results[ready.id] = blocked
                        reporter.cell_end(ready.label, "failed", blocked.error)
                        continue
                    free = [slot for slot in slots if slot.cell is None]
                    # a cell asking for more devices than there are gets them all, and fails naming its recipe key
                    need = min(ready.typed_recipe.gpus, len(slots))
                    if len(free) < need:
                        break  # wait for devices to come free, in plan order
                    pending.remove(ready)
                    held = free[:need]
                    devs = [slot.device for slot in held]
                    for slot in held:
                        slot.cell = ready.id
                    reporter.cell_start(f"{ready.label} on {','.join(devs)}")
                    held[0].send(spawn, events, threads, (ready, ctx, devs))
                    busy[ready.id] = (held, ready)
                try:
                    kind, payload = events.get(timeout=0.5)
                except queue.Empty:
                    for cid, (held, cell) in list(busy.items()):
                        if not held[0].alive():  # the next cell on this device starts a new worker
                            error = f"worker exited with code {held[0].process.exitcode}"
                            results[cid] = CellResult(cid, cell.label, "failed", error=error)
                            reporter.cell_end(cell.label, "failed", error)
                            for s in held:
                                s.cell = None
                            del busy[cid]
                    continue
                if kind == "result":
                    res: CellResult = payload
                    results[res.cell_id] = res
                    for s in busy.pop(res.cell_id)[0]:
                        s.cell = None
                    reporter.cell_end(res.label, res.status, res.error or _summary(res))
                else:
                    reporter.event(kind, **payload)
        finally:
            for slot in slots:
                slot.stop()
        return [results[c.id] for c in cells]


class _Slot:
    """One device of the local pool and its worker process, started at its first cell and
    kept for the next ones, as a single device runs every cell in one process: the imports,
    the CUDA context, the loaded data sets and the compiler's in-memory caches are paid once
    per device, not once per cell. A worker that dies fails its cell; the next cell on the
    device starts a new one."""

    def __init__(self, device: str):
        self.device = device
        self.cell: str | None = None  # the cell holding this device
        self.process = None
        self.inbox = None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def send(self, spawn, events, threads: int, job: tuple) -> None:
        if not self.alive():
            self.inbox = spawn.Queue()
            self.process = spawn.Process(target=_serve, args=(self.device, self.inbox, events, threads), daemon=True)
            self.process.start()
        self.inbox.put(job)

    def stop(self) -> None:
        """An idle worker ends when told; one still in a cell (the run was interrupted) gets
        SIGTERM, which ends its cell as Ctrl-C does: checkpointed, marked KILLED."""
        if not self.alive():
            return
        if self.cell is None:
            self.inbox.put(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=30)


def worker_threads(workers: int) -> int:
    """CPU threads for each of ``workers`` worker processes: an equal share of this
    machine's cores (OMP_NUM_THREADS, when set, wins). Left at torch's default, every worker
    takes all the cores for its CPU-side work (data, detection post-processing, COCOeval),
    the likely cause (not yet measured again) of FCOS epochs of 40-100 s on a 64-core host
    with six workers, against 8.5 s alone on a GPU machine."""
    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


def _serve(device: str, inbox, events, threads: int = 0) -> None:
    """A pool worker: runs the cells ``inbox`` hands it, one at a time, until it gets None."""
    if threads:
        torch.set_num_threads(threads)
    # SIGTERM (the parent ending, a scheduler's preemption) ends the cell like Ctrl-C: the
    # run is marked KILLED and the next run resumes it from the last epoch checkpoint
    signal.signal(signal.SIGTERM, _interrupted)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    while (job := inbox.get()) is not None:
        cell, ctx, devices = job
        ctx.device, ctx.devices = devices[0], tuple(devices)
        res = run_cell(cell, ctx, None, lambda kind, **kw: events.put((kind, kw)))
        events.put(("result", res))
        del res
        gc.collect()  # the cell's model and optimizer, before the next cell (or a DDP cell's
        if on_cuda:  # processes on this device) needs the memory
            torch.cuda.empty_cache()


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def _summary(res: CellResult) -> str:
    m = res.metrics
    if "top1" not in m:
        return ""
    return f"top-1 {m['top1']:.2f}%, {m.get('size_bytes', 0) / 1e3:.1f} kB, x{m.get('compression_ratio', 0):.1f}"
