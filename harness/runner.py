"""Run one cell: data -> model -> method.prepare -> calibrate -> train -> finalize ->
evaluate -> footprint -> record. Idempotent: a finished cell is skipped; a killed one
resumes from its last epoch checkpoint; a failing one is recorded as failed.

The evaluation protocol: the number a run reports (``top1``) is the final epoch's on the
test split. The best epoch on the test split is recorded separately as
``best_top1_selected_on_test`` (selected on the test split: an optimistic number, never the
result). Where the dataset has a validation split, ``val_top1`` is logged per epoch and
``test_top1_at_best_val`` is the test accuracy at the epoch with the best validation score.
"""

from __future__ import annotations

import errno
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from qbench.methods import Method, MethodContext, get_method
from qbench.methods.modules import set_fused
from qbench.methods.recipe import Recipe

from .errors import QbenchError
from .fit import CellState, Replicas, Trainer, cpu_state
from .models.weights import safe_load
from .suite import Cell
from .tracking import DATA_FINGERPRINT, RECORDED, TAG, RunRecord, Tracker
from .train import evaluate, seed_everything

Report = Callable[..., None]
#: the run tag the leaderboard reads as the A/W notation (``Run.tag("notation")``)
NOTATION = TAG + "notation"


@dataclass
class RunContext:
    out_dir: Path
    tracking_uri: str
    data_root: str | None = None
    device: str = "cpu"
    force: bool = False
    #: the devices a ``gpus: N`` cell may train on, one process each (empty: ``device``)
    devices: tuple[str, ...] = ()

    def cell_dir(self, cell_id: str) -> Path:
        return self.out_dir / "cells" / cell_id

    def tracker(self) -> Tracker:
        return Tracker(self.tracking_uri, self.out_dir / "mlartifacts")


@dataclass
class CellResult:
    cell_id: str
    label: str
    status: str  # done | failed | skipped
    metrics: dict = field(default_factory=dict)
    error: str = ""
    run_id: str | None = None


_DATA_CACHE: dict[tuple, object] = {}


def _dataset(cell: Cell, ctx: RunContext):
    from .data import load_dataset

    key = (cell.dataset, repr(sorted(cell.dataset_options.items())), ctx.data_root)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # hold one dataset at a time
        _DATA_CACHE[key] = load_dataset(cell.dataset, ctx.data_root, **cell.dataset_options)
    return _DATA_CACHE[key]


def parent_state(cell: Cell, ctx: RunContext, tracker: Tracker, runs: dict[str, RunRecord]) -> dict:
    """The parent's final weights: from this output folder, else from its MLflow run."""
    local = ctx.cell_dir(cell.parent) / "model.pt"
    if not local.exists():
        rec = runs.get(cell.parent) or tracker.runs().get(cell.parent)
        if rec is None or rec.status != "done":
            raise QbenchError(f"parent cell {cell.parent} has not finished", cell.label)
        local = tracker.download(rec.run_id, "checkpoint/model.pt", ctx.cell_dir(cell.parent))
    return safe_load(local, cell.label)


def run_cell(
    cell: Cell, ctx: RunContext, runs: dict[str, RunRecord] | None = None, report: Report | None = None
) -> CellResult:
    """Run ``cell`` unless its finished run is already in the store (``ctx.force`` reruns)."""
    tracker = ctx.tracker()
    runs = runs if runs is not None else tracker.runs()
    report = report or (lambda *a, **k: None)
    existing = runs.get(cell.id)
    if existing and existing.status == "done" and not ctx.force:
        return CellResult(cell.id, cell.label, "skipped", existing.metrics, run_id=existing.run_id)
    cdir = ctx.cell_dir(cell.id)
    resume_id, replaces = None, None
    if existing and existing.status in ("running", "killed") and existing.tags.get(RECORDED) == "1":
        # it crashed after its results were recorded, before it was marked finished
        tracker.finish(existing.run_id, "done")
        return CellResult(cell.id, cell.label, "done", existing.metrics, run_id=existing.run_id)
    if existing and existing.status == "failed":
        tracker.delete(existing.run_id)  # one run per cell: the new attempt replaces it
        CellState(cdir).clear()
    elif existing and existing.status == "done":  # --force: keep it until its replacement finished
        replaces = existing.run_id
        CellState(cdir).clear()
    elif existing:
        resume_id = existing.run_id  # killed mid-run: reopen it and resume from its checkpoint
    try:
        run_id = tracker.start(cell, resume_id)
    except Exception as e:  # the store itself failed (a server lost mid-suite): this cell fails
        _stop_if_no_space(e, ctx)
        return CellResult(cell.id, cell.label, "failed", error=f"the tracking store failed: {type(e).__name__}: {e}")
    try:
        metrics = _execute(cell, ctx, tracker, runs, run_id, report)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the epoch checkpoint stays, the next run resumes
        try:
            tracker.finish(run_id, "killed", "interrupted (SIGINT/SIGTERM); run the same command again to resume")
        except Exception:
            pass
        raise
    except Exception as e:  # a failing cell never takes the suite down (a full disk does)
        if no_space(e):
            try:
                tracker.finish(run_id, "killed", "no space left on the device; the next run resumes it")
            except Exception:
                pass
            _stop_if_no_space(e, ctx)
        reason = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc()
        try:
            tracker.set_tags(run_id, {"qbench.traceback": tb[-4000:]})
            tracker.finish(run_id, "failed", reason)
        except Exception:  # the store itself failed: still report the cell's own error
            pass
        return CellResult(cell.id, cell.label, "failed", error=reason, run_id=run_id)
    tracker.finish(run_id, "done")
    if replaces:
        tracker.delete(replaces)
    return CellResult(cell.id, cell.label, "done", metrics, run_id=run_id)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it: MLflow and SQLAlchemy wrap the OS's error) says the
    disk, a quota or a file-size limit is full, or SQLite could not write its file."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        text = str(e)
        if any(
            m in text for m in ("No space left on device", "database or disk is full", "File too large", "disk I/O")
        ):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _stop_if_no_space(e: BaseException, ctx: RunContext) -> None:
    """A full disk fails every later cell too: stop the suite with one line instead."""
    if no_space(e):
        raise QbenchError(
            "no space left on the device (or over a quota or file-size limit, or a disk I/O error) while writing "
            "the store or a checkpoint; free some space and run the same command again: finished cells are kept",
            str(ctx.out_dir),
        ) from None


@dataclass
class Built:
    """A cell ready to train: its data, prepared model, method and the method's context."""

    data: Any
    model: torch.nn.Module
    method: Method
    mctx: MethodContext
    trainer: Trainer
    progressive: bool


def model_and_method(cell: Cell, data) -> tuple[torch.nn.Module, Method]:
    """The cell's full-precision model for the dataset's shape, and its method instance."""
    from .models import create_model

    model = create_model(
        cell.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        **cell.model_options,
    )
    return model, get_method(cell.method)(cell.w_bits, cell.a_bits, **cell.options)


def tag_notation(cell: Cell, tracker: Tracker, run_id: str) -> None:
    """Tag the run with the method's :meth:`~qbench.methods.Method.notation` (``qbench.notation``),
    if it has one. Done before the data and model are built, so that a cell failing later still
    meets only the reported rows of its own notation (a product-quantization regime, say).
    The instance is a throwaway: constructing a method only validates its options."""
    notation = get_method(cell.method)(cell.w_bits, cell.a_bits, **cell.options).notation()
    if notation:
        tracker.set_tags(run_id, {NOTATION: notation})


def build(
    cell: Cell,
    ctx: RunContext,
    tracker: Tracker,
    runs: dict,
    run_id: str,
    report: Report,
    replicas: Replicas | None = None,
) -> Built:
    """Data, the full-precision model (parent weights loaded), the method's prepared model
    and its context: everything the cell's training needs, on the cell's device.
    ``replicas``: the processes training the cell together (:mod:`qbench.harness.ddp`);
    only the first writes the cell's state."""
    import copy

    r = cell.typed_recipe
    device = torch.device(ctx.device)
    tag_notation(cell, tracker, run_id)
    generator = seed_everything(cell.seed)
    data = _dataset(cell, ctx)
    # provenance: exactly which data this run read (qbench verify checks it again)
    tracker.set_tags(run_id, {DATA_FINGERPRINT: data.fingerprint()})
    model, method = model_and_method(cell, data)
    parent = parent_state(cell, ctx, tracker, runs) if cell.parent else None
    from_fp = parent is not None and cell.parent_method == "fp32"
    if from_fp:
        method.load_parent(model, parent, "fp32")
    replicas = replicas or Replicas()
    state = CellState(ctx.cell_dir(cell.id), writable=replicas.rank == 0)

    def log(metrics, step=None):
        tracker.log_metrics(run_id, dict(metrics), step=step)

    trainer = Trainer(data, method, r, device, generator, state, log, report, replicas)
    mctx = MethodContext(
        device=device,
        recipe=r,
        calib_batches=lambda: data.train.batches(r.batch_size, train=False, device=device),
        train_batches=lambda: data.train.batches(
            r.batch_size, train=True, device=device, generator=generator, drop_last=True
        ),
        teacher=copy.deepcopy(model).to(device).eval() if from_fp and method.needs_teacher else None,
        log=log,
        evaluate=lambda m: evaluate(m, data.test, r, device).as_dict(),
        fit=trainer.fit,
        save_state=lambda obj: state.save("method_state", obj),
        load_state=lambda: state.load("method_state"),
        seed=cell.seed,
        cell_id=cell.id,
    )
    model, progressive = prepare_from_parent(cell, model, method, mctx, parent)
    if device.type == "cuda" and r.channels_last:
        model.to(memory_format=torch.channels_last)
    return Built(data, model, method, mctx, trainer, progressive)


def prepare_from_parent(cell: Cell, model, method: Method, mctx: MethodContext, parent: dict | None):
    """``method.prepare`` the model, then load a quantized parent's state into it (a
    progressive chain; a full-precision parent's weights went in before prepare), on the
    cell's device. Returns (model, whether the parent was progressive)."""
    model = set_fused(method.prepare(model, mctx), mctx.recipe.fused)
    progressive = parent is not None and cell.parent_method != "fp32"
    if progressive:
        method.load_parent(model, parent, cell.parent_method)
    return model.to(mctx.device), progressive


def resuming(b: Built) -> bool:
    """Whether an earlier, killed attempt of the cell left state to resume from."""
    return b.trainer.state.exists() or b.trainer.state.load("method_state") is not None


def fit_cell(b: Built, resume: bool | None = None) -> dict:
    """Calibrate (a fresh start from the full-precision parent), then train: the method's
    own phase when it owns one, else the runner's loop. Returns the last stage's history.
    ``resume``: :func:`resuming`, when the caller decided it (default: read it now)."""
    if resume is None:
        resume = resuming(b)
    if not resume and not b.progressive:
        b.method.calibrate(b.model, b.mctx)
    r = b.mctx.recipe
    if r.train and not b.method.train(b.model, b.mctx):
        b.trainer.fit(b.model)
    return list(b.trainer.histories.values())[-1] if b.trainer.histories else {}


def measure(model: torch.nn.Module, method: Method, data, split: str, r: Recipe, device: torch.device):
    """Finalize, then the numbers a run reports: top-1/top-5/loss on ``split`` (and the
    validation split's top-1 where there is one), size, compression, BOPs and relative BOPs,
    bit audit.
    Returns (final model, metrics, footprint)."""
    model = method.finalize(model)
    result = evaluate(model, data.splits[split], r, device)
    example = next(iter(data.splits[split].batches(1, train=False, device=device)))[0]
    fp = method.footprint(model, example)
    metrics = {
        "top1": result.top1,
        "top5": result.top5,
        "test_loss": result.loss,
        "n_images": float(result.n),
        "size_bytes": fp.total_bytes,
        "fp32_bytes": fp.fp32_bytes,
        "compression_ratio": fp.compression_ratio,
        "bops": float(fp.bops),
        "bit_audit_ok": float(fp.audit_ok),
    }
    if fp.fp32_bops:  # percent of the model at 32 x 32 bits (Bayesian Bits' relative BOPs)
        metrics["rel_bops"] = fp.rel_bops
    if split == "test" and data.val is not None:
        metrics["val_top1"] = evaluate(model, data.val, r, device).top1
    return model, metrics, fp


def record(tracker: Tracker, run_id: str, metrics: dict, fp, model: torch.nn.Module, cdir: Path) -> None:
    """Log the final metrics, ``footprint.json`` and ``checkpoint/model.pt`` (a state_dict
    that loads with ``weights_only=True``)."""
    tracker.log_metrics(run_id, metrics)
    tracker.log_json(run_id, "footprint.json", fp.to_dict())
    final = cdir / "model.pt"
    CellState(cdir).folder.mkdir(parents=True, exist_ok=True)
    tmp = final.with_suffix(".pt.tmp")
    try:
        torch.save(cpu_state(model), tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
    tracker.log_file(run_id, final, "checkpoint")
    tracker.set_tags(run_id, {RECORDED: "1"})  # finishing from here on is idempotent


def _execute(cell: Cell, ctx: RunContext, tracker: Tracker, runs: dict, run_id: str, report: Report) -> dict:
    if cell.typed_recipe.gpus > 1:  # one process per device, DistributedDataParallel
        from .ddp import execute

        return execute(cell, ctx, tracker, runs, run_id, report)
    if getattr(cell, "task", "classification") != "classification":  # detection / instance segmentation
        from .detect import execute

        return execute(cell, ctx, tracker, runs, run_id, report)
    t0 = time.perf_counter()
    b = build(cell, ctx, tracker, runs, run_id, report)
    before = b.trainer.elapsed_before()  # training time of earlier, killed attempts
    history = fit_cell(b)
    return finish(cell, ctx, tracker, run_id, b, history, t0 - before)


def finish(cell: Cell, ctx: RunContext, tracker: Tracker, run_id: str, b: Built, history: dict, t0: float) -> dict:
    """After training: measure, record and forget the resumable state. ``t0``: when the cell
    started (``time.perf_counter()``), moved back by the training time of earlier, killed
    attempts. Returns the metrics."""
    model, metrics, fp = measure(b.model, b.method, b.data, "test", b.mctx.recipe, b.mctx.device)
    metrics["wall_time_s"] = time.perf_counter() - t0
    if history.get("best_epoch", -1) > 0:
        metrics["best_top1_selected_on_test"] = history["best_test"]
        metrics["best_epoch"] = history["best_epoch"]
    if history.get("test_at_best_val") is not None:
        metrics["test_top1_at_best_val"] = history["test_at_best_val"]
    cdir = ctx.cell_dir(cell.id)
    record(tracker, run_id, metrics, fp, model, cdir)
    b.trainer.state.clear()
    return metrics
