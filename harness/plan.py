"""Checks and estimates before a suite runs: devices that exist, data that is there, and
how long each cell will take, from one timed training step.

``qbench run --dry-run`` prints the plan with these; ``qbench run`` refuses a device that
is not usable before anything runs and, on the CPU, warns when the suite would take days.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .errors import QbenchError
from .suite import Cell

#: a CPU suite estimated above this many hours gets a warning before it starts
WARN_CPU_HOURS = 24.0


def check_devices(devices: list[str], where: str = "--device") -> list[str]:
    """Each of ``devices`` must be ``cpu`` or a visible ``cuda[:N]``; returns them normalised."""
    out = []
    for d in devices:
        d = d.strip()
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise QbenchError(f"{d!r} is not a device (expected cpu, cuda or cuda:N)", where) from None
        if dev.type == "cpu":
            out.append("cpu")
            continue
        if dev.type != "cuda":
            raise QbenchError(f"{d!r}: only cpu and cuda devices are supported", where)
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise QbenchError(f"{d} is not usable: no CUDA GPU is visible on this machine (use --device cpu)", where)
        index = 0 if dev.index is None else dev.index
        if index >= n:
            raise QbenchError(f"{d} does not exist: this machine has {n} GPU(s), cuda:0..cuda:{n - 1}", where)
        out.append(f"cuda:{index}")
    if not out:
        raise QbenchError("no device given", where)
    return out


def cpu_threads() -> None:
    """CPU cells run on one thread unless OMP_NUM_THREADS says otherwise: the papers' small
    CPU-sized models (digits, MNIST) run faster on one thread than on two busy ones."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


@dataclass
class Estimate:
    step_s: float  # one training step at the cell's batch size
    steps: int  # training steps of the whole cell
    eval_s: float  # evaluations over the cell (forward passes, estimated from the step)

    @property
    def seconds(self) -> float:
        return self.step_s * self.steps + self.eval_s


def _config_key(cell: Cell) -> tuple:
    return (
        cell.dataset,
        repr(sorted(cell.dataset_options.items())),
        cell.model,
        repr(sorted(cell.model_options.items())),
        cell.method,
        repr(sorted(cell.options.items())),
        cell.w_bits,
        cell.a_bits,
        cell.recipe["batch_size"],
    )


def _time_step(cell: Cell, data, device: torch.device) -> float:
    """Seconds of one training step of ``cell`` (its model, method and batch size) on
    ``device``, on a batch shaped like the dataset's, after one warm-up step."""
    from qbench.methods import MethodContext

    from .runner import model_and_method
    from .train import default_param_groups, make_optimizer, make_train_step

    r = cell.typed_recipe
    model, method = model_and_method(cell, data)
    x0, _ = next(iter(data.train.batches(min(r.batch_size, len(data.train)), train=False, device=device)))
    reps = -(-r.batch_size // x0.shape[0])
    x = x0.repeat(reps, *([1] * (x0.dim() - 1)))[: r.batch_size]
    y = torch.randint(0, data.num_classes, (x.shape[0],), device=device)
    ctx = MethodContext(device=device, recipe=r.with_(calib_batches=1), calib_batches=lambda: iter([(x, y)]))
    model = method.prepare(model, ctx).to(device)
    method.calibrate(model, ctx)
    model.train()
    groups = method.param_groups(model, r) or default_param_groups(model, r.weight_decay, r.wd_on)
    step = make_train_step(model, make_optimizer(groups, r), r, device, method.extra_loss)
    times = []
    for _ in range(5):  # two warm-up steps, then the median of three
        t = time.perf_counter()
        step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return sorted(times[2:])[1]


def classification_cells(cells: list[Cell]) -> list[Cell]:
    """The cells that classify: detection cells (``task``) are not timed or estimated here."""
    return [c for c in cells if getattr(c, "task", "classification") == "classification"]


def estimate(cells: list[Cell], data_root: str | None, device: str, report=None) -> dict[str, Estimate]:
    """Per cell id, the estimated time of ``cells`` on ``device``: their data are loaded
    (a missing dataset is a QbenchError naming what to put where) and one step of each
    distinct configuration is timed."""
    from .data import load_dataset

    cells = classification_cells(cells)
    dev = torch.device(device)
    if dev.type == "cpu":
        cpu_threads()  # time on the threads the cells will run on
    steps_cache: dict[tuple, float] = {}
    out: dict[str, Estimate] = {}
    data_key, data = None, None
    for cell in sorted(cells, key=lambda c: (c.dataset, repr(sorted(c.dataset_options.items())))):
        dk = (cell.dataset, repr(sorted(cell.dataset_options.items())))
        if dk != data_key:
            data_key, data = dk, load_dataset(cell.dataset, data_root, f"{cell.label}: dataset", **cell.dataset_options)
        key = _config_key(cell)
        if key not in steps_cache:
            if report:
                report(cell.label)
            with torch.random.fork_rng(devices=[]):
                steps_cache[key] = _time_step(cell, data, dev)
        r = cell.typed_recipe
        per_epoch = max(1, len(data.train) // r.batch_size)
        epochs = r.epochs if r.train else 0
        evals = (epochs // r.eval_every + 1) if epochs else 1
        # a forward pass costs about a third of a training step
        eval_images = len(data.test) + (len(data.val) if data.val is not None else 0)
        eval_s = evals * steps_cache[key] / 3 * eval_images / r.batch_size
        out[cell.id] = Estimate(steps_cache[key], per_epoch * epochs, eval_s)
    return out


def cpu_warning(cells: list[Cell], data_root: str | None) -> str | None:
    """A warning when ``cells`` would take more than :data:`WARN_CPU_HOURS` on the CPU
    (timed only when they pass over more than a few million images in all)."""
    from .data import load_dataset

    cells = classification_cells(cells)
    passes = 0
    sizes: dict[tuple, int] = {}
    for c in cells:
        dk = (c.dataset, repr(sorted(c.dataset_options.items())))
        if dk not in sizes:
            sizes[dk] = len(load_dataset(c.dataset, data_root, f"{c.label}: dataset", **c.dataset_options).train)
        passes += sizes[dk] * (c.recipe["epochs"] if c.recipe["train"] else 0)
    if passes < 5_000_000:
        return None
    total = sum(e.seconds for e in estimate(cells, data_root, "cpu").values())
    if total / 3600 < WARN_CPU_HOURS:
        return None
    return (
        f"these {len(cells)} cells need about {human(total)} on this CPU (one timed step each); "
        "run them on GPUs (--device cuda:0,...) or trim the suite (qbench run --dry-run shows each cell)"
    )


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
