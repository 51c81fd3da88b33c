"""Executors decide where cells run; the runner decides what a cell does.

An :class:`Executor` takes the plan (cells, parents first) and returns one
:class:`CellResult` per cell, never raising for a failing cell. A child whose parent
failed is recorded as failed without running. :class:`LocalExecutor` runs on this
machine: in this process on the CPU or a single GPU, or one worker process per visible
GPU. A ``gpus: N`` cell takes N free GPUs at once (on the CPU: N processes; see
:mod:`qbench.harness.ddp`). :mod:`qbench.harness.dask_executor` runs them on a Dask cluster.
"""

from __future__ import annotations

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
        results: dict[str, CellResult] = {}
        pending = list(cells)
        busy: dict[str, tuple] = {}  # cell id -> (process, cell, its devices)
        while pending or busy:
            while pending:
                ready = next(
                    (
                        c
                        for c in pending
                        if not c.parent or c.parent in results or c.parent not in {x.id for x in cells}
                    ),
                    None,
                )
                if ready is None:
                    break
                blocked = _blocked(ready, results)
                if blocked:
                    pending.remove(ready)
                    results[ready.id] = blocked
                    reporter.cell_end(ready.label, "failed", blocked.error)
                    continue
                taken = {d for _, _, devs in busy.values() for d in devs}
                free = [d for d in self.devices if d not in taken]
                # a cell asking for more devices than there are gets them all, and fails naming its recipe key
                need = min(ready.typed_recipe.gpus, len(self.devices))
                if len(free) < need:
                    break  # wait for devices to come free, in plan order
                pending.remove(ready)
                devs = free[:need]
                reporter.cell_start(f"{ready.label} on {','.join(devs)}")
                p = spawn.Process(
                    target=_worker, args=(ready, ctx, devs, events, worker_threads(len(self.devices))), daemon=True
                )
                p.start()
                busy[ready.id] = (p, ready, devs)
            try:
                kind, payload = events.get(timeout=0.5)
            except queue.Empty:
                for cid, (p, cell, _) in list(busy.items()):
                    if not p.is_alive() and cell.id not in results:
                        results[cell.id] = CellResult(
                            cell.id, cell.label, "failed", error=f"worker exited with code {p.exitcode}"
                        )
                        reporter.cell_end(cell.label, "failed", results[cell.id].error)
                        del busy[cid]
                continue
            if kind == "result":
                res: CellResult = payload
                results[res.cell_id] = res
                busy.pop(res.cell_id)[0].join()
                reporter.cell_end(res.label, res.status, res.error or _summary(res))
            else:
                reporter.event(kind, **payload)
        return [results[c.id] for c in cells]


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


def _worker(cell: Cell, ctx: RunContext, devices: list[str], events, threads: int = 0) -> None:
    if threads:
        torch.set_num_threads(threads)
    # SIGTERM (the parent ending, a scheduler's preemption) ends the cell like Ctrl-C: the
    # run is marked KILLED and the next run resumes it from the last epoch checkpoint
    signal.signal(signal.SIGTERM, _interrupted)
    ctx.device, ctx.devices = devices[0], tuple(devices)
    torch.cuda.set_device(torch.device(devices[0]))
    res = run_cell(cell, ctx, None, lambda kind, **kw: events.put((kind, kw)))
    events.put(("result", res))


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def _summary(res: CellResult) -> str:
    m = res.metrics
    if "top1" not in m:
        return ""
    return f"top-1 {m['top1']:.2f}%, {m.get('size_bytes', 0) / 1e3:.1f} kB, x{m.get('compression_ratio', 0):.1f}"
