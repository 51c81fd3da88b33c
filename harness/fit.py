"""The epoch loop every cell trains with (``ctx.fit`` for methods that own their
training), and the per-cell state that makes it resumable.

A stage (``train`` for the runner's own loop; a method names its own, e.g. ``finetune``)
checkpoints after every epoch: model, optimizer, schedule, random-number state and its
history. Started again after a kill, it continues from the last finished epoch; a stage
that finished returns its history at once with its final weights loaded.

A cell trained by several processes (``recipe: {gpus: N}``, :mod:`qbench.harness.ddp`)
runs this same loop in each; its :class:`Replicas` wrap the model, shard the batches and
keep the copies equal, and only the first process writes (a read-only :class:`CellState`
and no-op logging in the others).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from qbench.methods import Method
from qbench.methods.recipe import Recipe
from torch import nn

from .models.weights import safe_load
from .train import default_param_groups, evaluate, make_optimizer, make_scheduler, make_train_step, train_epoch

_STAGE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class CellState:
    """Files that let one cell resume: ``<out>/cells/<cell id>/<name>.pt``, written
    atomically and read back with ``weights_only=True``. ``name`` is a fixed identifier
    chosen by code, never by a suite or a user. ``writable=False`` reads the same files and
    writes nothing (the other processes of a cell trained by several)."""

    def __init__(self, folder: Path, writable: bool = True):
        self.folder = folder
        self.writable = writable

    def path(self, name: str) -> Path:
        if not _STAGE.match(name):
            raise ValueError(f"state name {name!r} must match {_STAGE.pattern}")
        return self.folder / f"{name}.pt"

    def save(self, name: str, obj: Any) -> None:
        path = self.path(name)
        if not self.writable:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind

    def load(self, name: str) -> Any | None:
        path = self.path(name)
        return safe_load(path, str(path)) if path.is_file() else None

    def exists(self) -> bool:
        return self.folder.is_dir() and any(p.name.startswith("stage_") for p in self.folder.glob("*.pt"))

    def clear(self) -> None:
        """Forget the resumable state (the cell finished); the final ``model.pt`` stays."""
        if not self.writable or not self.folder.is_dir():
            return
        for p in self.folder.glob("*.pt*"):
            if p.name != "model.pt":
                p.unlink(missing_ok=True)


def cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_stage(state: CellState, key: str, model: nn.Module, opt, sched, generator: torch.Generator, history) -> None:
    """Checkpoint one training stage after an epoch: model, optimizer, schedule, random-number
    state and ``history`` (whose ``elapsed`` seconds :func:`elapsed_before` sums)."""
    state.save(
        key,
        {
            "model": cpu_state(model),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
        },
    )


def restore_stage(state: CellState, key: str, model: nn.Module, opt, sched, generator: torch.Generator):
    """Load the stage ``key`` saved by :func:`save_stage` into the objects given; returns its
    history, or None when nothing was saved."""
    saved = state.load(key)
    if saved is None:
        return None
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["history"]


def elapsed_before(state: CellState) -> float:
    """Seconds of training that earlier, killed attempts of a cell spent (all its stages)."""
    total = 0.0
    for p in sorted(state.folder.glob("stage_*.pt")) if state.folder.is_dir() else []:
        saved = state.load(p.stem)
        total += float(saved["history"].get("elapsed", 0.0)) if saved else 0.0
    return total


class Replicas:
    """The processes that train one cell together; this base class is the one process of
    an ordinary cell, where every hook does nothing. :class:`qbench.harness.ddp.DDPReplicas`
    is several, with DistributedDataParallel."""

    rank = 0
    world = 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module a training step calls (DDP), wrapped after calibration and restore."""
        return model

    def shard(self, split):
        """The part of each global training batch this process trains on."""
        return split

    def after_step(self, on_step: Callable[[nn.Module, int], None]) -> Callable[[nn.Module, int], None]:
        """``on_step``, plus whatever keeps the copies equal after an optimizer step."""
        return on_step

    def sync(self, model: nn.Module) -> None:
        """Make every copy of ``model`` equal to the first one (after an epoch)."""

    def mean(self, *values: float) -> tuple[float, ...]:
        """``values`` averaged over the processes (each trained on an equal share)."""
        return values


def compiled(model: nn.Module, r: Recipe, device: torch.device) -> nn.Module:
    """``model`` under ``torch.compile`` where the recipe asks for it on CUDA: with
    ``cudagraphs``, ``mode="reduce-overhead"`` (CUDA graphs, for static shapes), else the
    default mode."""
    if not (r.compile and device.type == "cuda"):
        return model
    return torch.compile(model, mode="reduce-overhead") if r.cudagraphs else torch.compile(model)


@dataclass
class Trainer:
    """What :meth:`fit` needs from the cell; built by the runner, offered as ``ctx.fit``."""

    data: Any  # a DataBundle: train/test (and val) splits
    method: Method
    recipe: Recipe
    device: torch.device
    generator: torch.Generator
    state: CellState
    log: Callable[..., None]
    report: Callable[..., None]
    replicas: Replicas = field(default_factory=Replicas)

    def __post_init__(self) -> None:
        self.histories: dict[str, dict] = {}

    def fit(
        self,
        model: nn.Module,
        *,
        stage: str = "train",
        epochs: int | None = None,
        recipe: Recipe | None = None,
        param_groups: list[dict] | None = None,
        loss_fn=None,
        extra_loss=None,
        on_step=None,
    ) -> dict:
        """Train ``model`` for one stage (see :class:`qbench.methods.base.Fit`)."""
        r = recipe or self.recipe
        epochs = r.epochs if epochs is None else int(epochs)
        if epochs != r.epochs:
            r = r.with_(epochs=epochs)
        m, data, device = self.method, self.data, self.device
        groups = param_groups or m.param_groups(model, r) or default_param_groups(model, r.weight_decay, r.wd_on)
        opt = make_optimizer(groups, r)
        steps = max(1, len(data.train) // r.batch_size)
        sched = make_scheduler(opt, r, steps)
        key = "stage_" + stage
        self.state.path(key)  # validates the name before any work
        history: dict = {
            "epoch": 0,
            "best_test": -1.0,
            "best_epoch": -1,
            "best_val": -1.0,
            "test_at_best_val": None,
            "elapsed": 0.0,
        }
        saved = restore_stage(self.state, key, model, opt, sched, self.generator)
        if saved is not None:
            history.update(saved)
        self.histories[stage] = history
        start = int(history["epoch"])
        if start >= epochs:
            return history
        rep = self.replicas
        net = rep.wrap(model)  # after calibration and restore: DDP starts every copy from the first one
        forward = compiled(net, r, device)
        evaluated = forward if net is model else model  # every process evaluates its own (equal) copy
        step = make_train_step(model, opt, r, device, extra_loss or m.extra_loss, loss_fn=loss_fn, forward=forward)
        hook = rep.after_step(on_step or m.on_step)
        train = rep.shard(data.train)
        prefix = "" if stage == "train" else stage + "/"
        self.report("cell_epochs", total=epochs, done=start)
        for epoch in range(start, epochs):
            e0 = time.perf_counter()
            loss, acc, _ = train_epoch(model, train, step, sched, r, device, self.generator, hook, epoch * steps)
            rep.sync(model)
            loss, acc = rep.mean(loss, acc)
            logged = {"train_loss": loss, "train_top1": acc, "lr": opt.param_groups[0]["lr"]}
            if (epoch + 1) % r.eval_every == 0 or epoch + 1 == epochs:
                test = evaluate(evaluated, data.test, r, device)
                logged.update(test_top1=test.top1, test_loss=test.loss)
                if test.top1 > history["best_test"]:
                    history["best_test"], history["best_epoch"] = test.top1, epoch + 1
                if data.val is not None:
                    val = evaluate(evaluated, data.val, r, device)
                    logged["val_top1"] = val.top1
                    if val.top1 > history["best_val"]:
                        history["best_val"], history["test_at_best_val"] = val.top1, test.top1
            logged["epoch_time_s"] = time.perf_counter() - e0
            self.log({prefix + k: v for k, v in logged.items()}, epoch + 1)
            history["elapsed"] += time.perf_counter() - e0
            history["epoch"] = epoch + 1
            save_stage(self.state, key, model, opt, sched, self.generator, history)
            self.report("epoch", epoch=epoch + 1, total=epochs, metrics=logged)
        return history

    def elapsed_before(self) -> float:
        """Seconds of training that earlier, killed attempts of this cell spent."""
        return elapsed_before(self.state)
