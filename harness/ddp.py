"""One cell on several devices: ``recipe: {gpus: N}`` trains it with DistributedDataParallel,
one process per device (NCCL on GPUs, gloo on the CPU).

Each process builds the same data, model and method from the cell's seed and calibrates
on the same un-augmented batches, so every data-driven initialisation (step sizes, ranges,
observers) gives the same values everywhere. Training is the one loop every cell uses
(:class:`qbench.harness.fit.Trainer`, also behind ``ctx.fit`` for the methods that own
their stages); here its :class:`DDPReplicas`:

* wrap the model in DDP when a stage starts, after calibration and after a resumed
  stage's checkpoint is loaded: DDP starts every copy from the first process's parameters
  and buffers, and broadcasts the buffers again before each forward (BatchNorm's running
  statistics and the quantizers' observed state follow the first process's share);
* split each global batch of the recipe's ``batch_size``: every process draws the same
  permutation and augmentation from the shared seed (the single-process run's batches),
  and process ``r`` trains on the ``r``-th equal slice; gradients are averaged over the
  processes, so one step is the step of the whole batch, at the recipe's learning rate;
* after the first optimizer step, when a quantizer was still uninitialised at the wrap
  (``calib_batches: 0``: it initialised on its own slice), copy the first process's
  state to the others; after every epoch, its buffers;
* average the logged training loss and accuracy over the processes.

Every process evaluates the whole test split with its own (equal) copy, so a method that
decides on an evaluation decides the same everywhere; only the first process logs to
MLflow, writes stage checkpoints and records the final metrics and model. A resumed cell
restores the same stage checkpoint in every process. At the end the processes compare a
digest of every tensor of their state: copies that differ fail the cell (naming the
tensors) instead of recording a number that depends on which process wrote it.

The processes are started with ``python -m qbench.harness.ddp`` (not ``multiprocessing``:
a worker of the local executor or of Dask may not have children of its own), meet through
a TCP store this process holds on a free localhost port, and end when it ends. The first
process to fail fails the cell with its error; the others are stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import QbenchError
from .fit import Replicas
from .suite import Cell

#: DDP finds the parameters a forward did not use (a method's gates, a frozen branch)
#: instead of waiting for their gradients forever; it costs one walk of the graph per step
FIND_UNUSED = True
#: seconds a stopped process gets to end before it is killed
STOP_S = 10.0


class DDPError(RuntimeError):
    """A process of a cell trained with DistributedDataParallel failed, or the copies differ."""


class RemoteTraceback(Exception):
    """The traceback of a failed process, chained to its DDPError (``qbench.traceback``)."""


class DDPReplicas(Replicas):
    """``world`` processes training one cell with DistributedDataParallel; this is process
    ``rank``, training on ``device`` (see the module docstring)."""

    def __init__(self, rank: int, world: int, device: torch.device, find_unused: bool = FIND_UNUSED):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.find_unused = find_unused
        self._uninitialised = False

    def wrap(self, model: nn.Module) -> nn.Module:
        from qbench.methods.modules import Quantizer
        from torch.nn.parallel import DistributedDataParallel

        if not any(p.requires_grad for p in model.parameters()):
            return model  # nothing to average
        self._uninitialised = any(isinstance(m, Quantizer) and not m.is_initialized() for m in model.modules())
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers from the first process before every forward (the key was renamed in torch 2.14)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": True}
        # gradients are views into the all-reduce buckets: no copy into them after each backward
        return DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=self.find_unused, gradient_as_bucket_view=True, **sync
        )

    def shard(self, split):
        return Shard(split, self.rank, self.world)

    def after_step(self, on_step: Callable[[nn.Module, int], None]) -> Callable[[nn.Module, int], None]:
        def hook(model: nn.Module, step: int) -> None:
            if self._uninitialised:  # each copy initialised on its own slice: take the first one's
                broadcast(model.parameters())
                broadcast(model.buffers())
                self._uninitialised = False
            on_step(model, step)

        return hook

    def sync(self, model: nn.Module) -> None:
        broadcast(model.buffers())  # the last forward's running statistics, the first process's

    def mean(self, *values: float) -> tuple[float, ...]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return tuple((t / self.world).tolist())


def broadcast(tensors) -> None:
    """Overwrite ``tensors`` with the first process's values."""
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, 0)


class Shard:
    """Process ``rank``'s slice of each global batch of ``split`` (see the module
    docstring). ``len`` is the whole split's, so the steps per epoch stay the recipe's."""

    def __init__(self, split, rank: int, world: int):
        self.split, self.rank, self.world = split, rank, world

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, batch_size: int, **kwargs):
        for x, y in self.split.batches(batch_size, **kwargs):
            n = y.shape[0]
            if n % self.world:
                raise QbenchError(
                    f"a training batch of {n} images does not split evenly among gpus: {self.world} processes; "
                    f"make batch_size a multiple of {self.world}",
                    "recipe.batch_size",
                )
            k = n // self.world
            yield x[self.rank * k : (self.rank + 1) * k], y[self.rank * k : (self.rank + 1) * k]


# -- the copies are equal ----------------------------------------------------------------


def state_digests(model: nn.Module) -> dict[str, str]:
    """A digest of every tensor in ``model``'s state dict (its exact bytes, dtype and shape)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def differing(digests: list[dict[str, str]]) -> list[str]:
    """The tensors (by name) whose digests are not the same in every process."""
    names = sorted(set().union(*digests))
    return [n for n in names if len({d.get(n) for d in digests}) > 1]


def check_replicas(model: nn.Module) -> None:
    """Raise DDPError unless every process holds bit-identical copies of ``model``'s state."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state_digests(model))
    bad = differing(gathered)
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DDPError(
            f"the {len(gathered)} copies of the model differ after training in {len(bad)} tensor(s) ({names}): "
            "this method's state is not kept equal under DistributedDataParallel; train it with gpus: 1"
        )


# -- a cell ---------------------------------------------------------------------------------


def cell_devices(cell, ctx) -> list[str]:
    """The devices of a ``gpus: N`` cell, one per process: N times the CPU on the CPU, else
    the first N of those the executor gave it (QbenchError when there are fewer)."""
    n = cell.typed_recipe.gpus
    given = list(ctx.devices) or [ctx.device]
    if all(torch.device(d).type == "cpu" for d in given):
        return ["cpu"] * n
    if len(set(given)) < n:
        example = ",".join(f"cuda:{i}" for i in range(n))
        raise QbenchError(
            f"recipe gpus: {n} needs {n} GPUs, this cell was given {len(set(given))} ({', '.join(given)}): "
            f"run with --device {example} (or more), or lower gpus",
            cell.label,
        )
    return given[:n]


def execute(cell, ctx, tracker, runs: dict, run_id: str, report: Callable[..., None]) -> dict:
    """Train, measure and record ``cell`` (``gpus`` > 1) with one process per device;
    returns the metrics the first process recorded in run ``run_id``."""
    from .runner import parent_state

    r = cell.typed_recipe
    if cell.task != "classification":
        raise QbenchError(f"recipe gpus: {r.gpus} trains classification cells only; use gpus: 1", cell.label)
    devices = cell_devices(cell, ctx)
    if r.batch_size % len(devices):
        raise QbenchError(
            f"recipe batch_size: {r.batch_size} does not split evenly among gpus: {len(devices)}; "
            f"make it a multiple of {len(devices)}",
            cell.label,
        )
    if cell.parent:
        parent_state(cell, ctx, tracker, runs)  # fetched once, here, for every process to read
    return launch("cell", {"cell": cell, "ctx": ctx, "run_id": run_id}, devices, report)


class _NoTracker:
    """The tracking store of a cell's other processes: the first one records, they do not."""

    def set_tags(self, run_id: str, tags: dict) -> None:
        pass

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        pass

    def runs(self) -> dict:
        return {}


class _Events:
    """``report(kind, **fields)`` of the first process: JSON lines the launcher passes on."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, kind: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **fields}, default=float) + "\n")


def _cell(rank: int, world: int, device: torch.device, folder: Path, cell, ctx, run_id: str) -> dict | None:
    """One process of a cell: build, fit (DDP), check the copies; the first also records."""
    from .runner import build, finish, fit_cell, resuming
    from .tracking import TAG

    main = rank == 0
    ctx = replace(ctx, device=str(device), devices=())
    tracker = ctx.tracker() if main else _NoTracker()
    t0 = time.perf_counter()
    report = _Events(folder / "events.jsonl") if main else _quiet
    b = build(cell, ctx, tracker, {}, run_id, report, DDPReplicas(rank, world, device))
    before = b.trainer.elapsed_before()
    resume = resuming(b)
    dist.barrier()  # every process has read the cell's state before the first one writes it
    history = fit_cell(b, resume)
    check_replicas(b.model)
    if not main:
        return None
    tracker.set_tags(run_id, {TAG + "ddp": f"{world} processes ({dist.get_backend()}), final states identical"})
    return finish(cell, ctx, tracker, run_id, b, history, t0 - before)


def _quiet(*args, **kwargs) -> None:
    pass


# -- throughput --------------------------------------------------------------------------


def ddp_images_per_second(
    model_name: str = "resnet18",
    image_size: int = 224,
    batch_per_gpu: int = 128,
    steps: int = 30,
    warmup: int = 10,
    devices: list[str] | None = None,
    num_classes: int = 1000,
    in_channels: int = 3,
    compile: bool = False,
    find_unused: bool = FIND_UNUSED,
) -> float:
    """Training images per second of ``model_name`` on ``devices`` (default: every visible
    GPU), one process each, with the cell's training step (bf16 autocast and channels_last
    on CUDA, SGD) on synthetic data made on the device; DDP when there are several devices,
    the plain model on one. ``warmup`` steps are not timed; the ``steps`` after them are,
    with one synchronisation at each end, and the slowest process sets the pace. On the CPU
    (``devices=["cpu", "cpu"]``) it runs with gloo. ``compile``: the step under
    ``torch.compile`` as a cell with ``compile: true`` (CUDA only); ``find_unused``: DDP's
    search for parameters a forward did not use (a cell's setting, :data:`FIND_UNUSED`)."""
    if devices is None:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    args = dict(
        model_name=model_name,
        image_size=image_size,
        batch_per_gpu=batch_per_gpu,
        steps=steps,
        warmup=warmup,
        num_classes=num_classes,
        in_channels=in_channels,
        compile=compile,
        find_unused=find_unused,
    )
    return float(launch("throughput", args, list(devices)))


def _throughput(
    rank: int,
    world: int,
    device: torch.device,
    folder: Path,
    model_name: str,
    image_size: int,
    batch_per_gpu: int,
    steps: int,
    warmup: int,
    num_classes: int,
    in_channels: int,
    compile: bool = False,
    find_unused: bool = FIND_UNUSED,
) -> float:
    from qbench.methods.recipe import Recipe

    from .fit import compiled
    from .models import create_model
    from .train import default_param_groups, make_optimizer, make_train_step

    torch.manual_seed(0)
    r = Recipe(batch_size=batch_per_gpu * world, compile=compile)
    cl = r.channels_last and device.type == "cuda"
    model = create_model(model_name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    model = model.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format).train()
    net = compiled((DDPReplicas(rank, world, device, find_unused) if world > 1 else Replicas()).wrap(model), r, device)
    opt = make_optimizer(default_param_groups(model, r.weight_decay, r.wd_on), r)
    step = make_train_step(model, opt, r, device, forward=net)
    x = torch.randn(batch_per_gpu, in_channels, image_size, image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    y = torch.randint(0, num_classes, (batch_per_gpu,), device=device)
    for _ in range(warmup):
        step(x, y)
    _synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    _synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return batch_per_gpu * world * steps / elapsed.item()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the processes -----------------------------------------------------------------------


def _encode(obj: Any) -> dict:
    """The launcher's objects as JSON for the processes (no pickle crosses a file): a
    :class:`Cell` and a :class:`RunContext` by their fields."""
    from .runner import RunContext

    if isinstance(obj, Cell):
        return {"__cell__": dataclasses.asdict(obj)}
    if isinstance(obj, RunContext):
        return {"__run_context__": {**dataclasses.asdict(obj), "out_dir": str(obj.out_dir)}}
    raise TypeError(f"{type(obj).__name__} cannot be handed to a DDP process")


def _decode(d: dict) -> Any:
    from .runner import RunContext

    if "__cell__" in d:
        return Cell(**d["__cell__"])
    if "__run_context__" in d:
        f = d["__run_context__"]
        return RunContext(**{**f, "out_dir": Path(f["out_dir"]), "devices": tuple(f["devices"])})
    return d


_TARGETS = {"cell": _cell, "throughput": _throughput}


def launch(target: str, args: dict, devices: list[str], report: Callable[..., None] | None = None) -> Any:
    """Run ``_TARGETS[target](rank, world, device, folder, **args)`` in one process per
    device and return the first process's result. Raises DDPError naming the first process
    that failed (the others are stopped), KeyboardInterrupt when one was interrupted;
    no process outlives this call."""
    world = len(devices)
    backend = "nccl" if torch.device(devices[0]).type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # a free port, held
    folder = Path(tempfile.mkdtemp(prefix="qbench-ddp-"))
    spec = {"target": target, "args": args, "devices": devices, "backend": backend, "port": store.port}
    spec.update(folder=str(folder), parent=os.getpid())
    (folder / "spec.json").write_text(json.dumps(spec, default=_encode))
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world):
            with open(folder / f"rank{rank}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", __name__, str(folder / "spec.json"), str(rank)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        events = _EventReader(folder / "events.jsonl", report)
        while True:
            events.forward()
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                raise _failure(codes, folder)
            if all(c == 0 for c in codes):
                break
            time.sleep(0.1)
        events.forward()
        return json.loads((folder / "result.json").read_text())
    finally:
        _stop(procs)
        del store
        shutil.rmtree(folder, ignore_errors=True)


class _EventReader:
    """Passes the first process's progress events (complete JSON lines) on to ``report``."""

    def __init__(self, path: Path, report: Callable[..., None] | None):
        self.path, self.report, self.offset = path, report, 0

    def forward(self) -> None:
        if self.report is None or not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            event = json.loads(line)
            self.report(event.pop("kind"), **event)


#: a process's exit status when a signal (SIGINT, SIGTERM) interrupted it
_INTERRUPTED = 130


def _failure(codes: list[int | None], folder: Path) -> BaseException:
    """The error of the first process that failed (its error file written first), or
    KeyboardInterrupt when a signal interrupted one."""
    if _INTERRUPTED in codes:
        return KeyboardInterrupt()
    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    written = [r for r in failed if (folder / f"error{r}.txt").is_file()]
    if written:
        rank = min(written, key=lambda r: (folder / f"error{r}.txt").stat().st_mtime_ns)
        err = json.loads((folder / f"error{rank}.txt").read_text())
        e = DDPError(f"process {rank} of {len(codes)}: {err['error']}")
        e.__cause__ = RemoteTraceback(err["traceback"])
        return e
    rank = failed[0]
    tail = (folder / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-3:]
    return DDPError(f"process {rank} of {len(codes)} exited with status {codes[rank]}: {' | '.join(tail)}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """End the processes still running: SIGTERM (they stop like Ctrl-C), then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def _watch_parent(parent: int) -> None:
    """End this process when the one that started it is gone (killed with SIGKILL, say)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="qbench-ddp-parent").start()


def _main(spec_path: str, rank: int) -> int:
    """One process: join the group, run the target, leave the result or the error in the
    launcher's folder. Returns the exit status."""
    spec = json.loads(Path(spec_path).read_text(), object_hook=_decode)
    folder = Path(spec["folder"])
    _watch_parent(spec["parent"])
    signal.signal(signal.SIGTERM, _interrupted)
    world = len(spec["devices"])
    device = torch.device(spec["devices"][rank])
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            from .plan import cpu_threads

            cpu_threads()
        store = dist.TCPStore("127.0.0.1", spec["port"], is_master=False)
        dist.init_process_group(
            spec["backend"],
            store=store,
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" else None,
        )
        result = _TARGETS[spec["target"]](rank, world, device, folder, **spec["args"])
        if rank == 0:
            tmp = folder / "result.json.tmp"
            tmp.write_text(json.dumps(result))
            os.replace(tmp, folder / "result.json")
        dist.barrier()  # leave the group together: one leaving while another works can abort it
        dist.destroy_process_group()
        return 0
    except KeyboardInterrupt:
        return _INTERRUPTED
    except BaseException as e:
        err = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        (folder / f"error{rank}.txt").write_text(json.dumps(err))
        return 1


if __name__ == "__main__":
    code = _main(sys.argv[1], int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is written: skip the interpreter's teardown, where the communication
    # library's threads can abort a process that has finished its work
    os._exit(code)
