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

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import QbenchError
from .suite import Cell
from .tracking import RunRecord, Tracker

Report = Callable[..., None]


@dataclass
class RunContext:
    out_dir: Path
    tracking_uri: str
    data_root: str | None = None
    device: str = "cpu"
    force: bool = False

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


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def parent_state(cell: Cell, ctx: RunContext, tracker: Tracker, runs: dict[str, RunRecord]) -> dict:
    """The parent's final weights: from this output folder, else from its MLflow run."""
    local = ctx.cell_dir(cell.parent) / "model.pt"
    if not local.exists():
        rec = runs.get(cell.parent) or tracker.runs().get(cell.parent)
        if rec is None or rec.status != "done":
            raise QbenchError(f"parent cell {cell.parent} has not finished", cell.label)
        local = tracker.download(rec.run_id, "checkpoint/model.pt", ctx.cell_dir(cell.parent))
    return torch.load(local, map_location="cpu", weights_only=True)


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
    resume_id = None
    if existing and (ctx.force or existing.status == "failed"):
        tracker.delete(existing.run_id)  # one run per cell: the new attempt replaces it
        for f in ("last.pt", "model.pt"):
            (cdir / f).unlink(missing_ok=True)
    elif existing:
        resume_id = existing.run_id  # killed mid-run: reopen it and resume from last.pt
    run_id = tracker.start(cell, resume_id)
    try:
        metrics = _execute(cell, ctx, tracker, runs, run_id, report)
    except KeyboardInterrupt:
        tracker.finish(run_id, "failed", "interrupted")
        raise
    except Exception as e:  # a failing cell never takes the suite down
        reason = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc()
        try:
            tracker.set_tags(run_id, {"qbench.traceback": tb[-4000:]})
            tracker.finish(run_id, "failed", reason)
        except Exception:  # the store itself failed: still report the cell's own error
            pass
        return CellResult(cell.id, cell.label, "failed", error=reason, run_id=run_id)
    tracker.finish(run_id, "done")
    return CellResult(cell.id, cell.label, "done", metrics, run_id=run_id)


def _execute(cell: Cell, ctx: RunContext, tracker: Tracker, runs: dict, run_id: str, report: Report) -> dict:
    from qbench.methods import MethodContext, get_method

    from .models import create_model
    from .train import default_param_groups, evaluate, make_optimizer, make_scheduler, seed_everything, train_epoch

    t0 = time.perf_counter()
    r = cell.recipe
    device = torch.device(ctx.device)
    generator = seed_everything(cell.seed)
    data = _dataset(cell, ctx)
    model = create_model(
        cell.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        **cell.model_options,
    )
    method = get_method(cell.method)(cell.w_bits, cell.a_bits, **cell.options)
    parent = parent_state(cell, ctx, tracker, runs) if cell.parent else None
    if parent is not None and cell.parent_method == "fp32":
        model.load_state_dict(parent)
    teacher = None
    mctx = MethodContext(
        device=device,
        recipe=r,
        cell=cell,
        calib_batches=lambda: data.train.batches(r["batch_size"], train=False, device=device),
    )
    if parent is not None and cell.parent_method == "fp32" and getattr(method, "needs_teacher", False):
        import copy

        teacher = copy.deepcopy(model).to(device).eval()
        mctx.teacher = teacher
    model = method.prepare(model, mctx)
    if parent is not None and cell.parent_method != "fp32":
        method.load_parent(model, parent, cell.parent_method)
    model.to(device)
    if device.type == "cuda" and r["channels_last"]:
        model.to(memory_format=torch.channels_last)

    cdir = ctx.cell_dir(cell.id)
    last = cdir / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=True) if last.exists() else None
    has_val = data.val is not None
    history: dict = {"best_test": -1.0, "best_epoch": -1, "best_val": -1.0, "test_at_best_val": None, "elapsed": 0.0}
    if state is not None:
        model.load_state_dict(state["model"])
        history.update(state["history"])
    elif not (parent is not None and cell.parent_method == cell.method):
        method.calibrate(model, mctx)
    before = history["elapsed"]  # epoch time spent by earlier, killed attempts

    epochs = r["epochs"] if r["train"] else 0
    if epochs and not method.train(model, mctx):
        groups = method.param_groups(model, r) or default_param_groups(model, r["weight_decay"], r["wd_on"])
        opt = make_optimizer(groups, r)
        steps = max(1, len(data.train) // r["batch_size"])
        sched = make_scheduler(opt, r, steps)
        start = 0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start = int(state["epoch"])
        forward = torch.compile(model) if (r["compile"] and device.type == "cuda") else model
        report("cell_epochs", total=epochs, done=start)
        for epoch in range(start, epochs):
            e0 = time.perf_counter()
            loss, acc, _ = train_epoch(
                model,
                data.train,
                opt,
                sched,
                r,
                device,
                generator,
                method.extra_loss,
                method.on_step,
                epoch * steps,
                forward,
            )
            m = {"train_loss": loss, "train_top1": acc, "lr": opt.param_groups[0]["lr"]}
            if (epoch + 1) % r["eval_every"] == 0 or epoch + 1 == epochs:
                test = evaluate(forward, data.test, r, device)
                m.update(test_top1=test.top1, test_loss=test.loss)
                if test.top1 > history["best_test"]:
                    history["best_test"], history["best_epoch"] = test.top1, epoch + 1
                if has_val:
                    val = evaluate(forward, data.val, r, device)
                    m["val_top1"] = val.top1
                    if val.top1 > history["best_val"]:
                        history["best_val"], history["test_at_best_val"] = val.top1, test.top1
            m["epoch_time_s"] = time.perf_counter() - e0
            tracker.log_metrics(run_id, m, step=epoch + 1)
            history["elapsed"] += time.perf_counter() - e0
            _atomic_save(
                {
                    "model": _cpu_state(model),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch + 1,
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                },
                last,
            )
            report("epoch", epoch=epoch + 1, total=epochs, metrics=m)

    model = method.finalize(model)
    final = evaluate(model, data.test, r, device)
    example = next(iter(data.test.batches(1, train=False, device=device)))[0]
    fp = method.footprint(model, example)
    metrics = {
        "top1": final.top1,
        "top5": final.top5,
        "test_loss": final.loss,
        "size_bytes": fp.total_bytes,
        "fp32_bytes": fp.fp32_bytes,
        "compression_ratio": fp.compression_ratio,
        "bops": float(fp.bops),
        "bit_audit_ok": float(fp.audit_ok),
        "wall_time_s": before + (time.perf_counter() - t0),
    }
    if history["best_epoch"] > 0:
        metrics["best_top1_selected_on_test"] = history["best_test"]
        metrics["best_epoch"] = history["best_epoch"]
    if has_val:
        metrics["val_top1"] = evaluate(model, data.val, r, device).top1
        if history["test_at_best_val"] is not None:
            metrics["test_top1_at_best_val"] = history["test_at_best_val"]
    tracker.log_metrics(run_id, metrics)
    tracker.log_json(run_id, "footprint.json", fp.to_dict())
    final_path = cdir / "model.pt"
    _atomic_save(_cpu_state(model), final_path)
    tracker.log_file(run_id, final_path, "checkpoint")
    last.unlink(missing_ok=True)
    return metrics
