"""Detection and instance-segmentation cells: the runner's path for ``task: detection`` and
``task: instance_segmentation`` (RetinaNet, FCOS, Mask R-CNN on COCO-format data).

The same life as a classification cell (data -> model -> method.prepare -> calibrate ->
train -> finalize -> evaluate -> footprint -> record) with detection's pieces: the data
is a :class:`~qbench.harness.data.detection.DetectionBundle`, the model a torchvision
detector from :func:`~qbench.harness.models.detection.create_detector`, a training step
sums torchvision's loss dict (plus the method's ``extra_loss``), and the reported numbers
are COCO AP from pycocotools' COCOeval (:mod:`qbench.harness.detection_metrics`):
``box_ap`` ... ``box_apl`` and, for ``instance_segmentation``, ``mask_ap`` ... ``mask_apl``,
in percent, on the test split (val2017) after the last epoch.

The optimiser and schedule are the recipe's (SGD with momentum by default, stepped per
iteration; weight decay on conv/linear weights only), as in the classification loop.
Training checkpoints after every epoch (model, optimizer, schedule, random-number state,
the losses so far: ``<out>/cells/<cell id>/stage_train.pt``, as the classification loop),
so a killed cell resumes from its last finished epoch in the same MLflow run.
Not (yet) here: methods that own their training (``ctx.fit``) and BOPs (the footprint has
sizes and bits only: heads shared across FPN levels make per-layer MAC counts by hooks
wrong).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from qbench.methods import Method, MethodContext, get_method
from qbench.methods.recipe import Recipe
from torch import nn

from .data.detection import DetectionBundle, load_detection_dataset
from .detection_metrics import coco_metrics, finite
from .errors import QbenchError
from .fit import CellState, elapsed_before, restore_stage, save_stage
from .models.detection import create_detector, predicts_masks
from .train import default_param_groups, make_optimizer, make_scheduler, seed_everything

TASKS = ("classification", "detection", "instance_segmentation")
#: the training checkpoint's name in the cell's folder (as the classification loop's)
STAGE = "stage_train"


def _no_fit(model: nn.Module, **kwargs) -> dict:
    raise QbenchError("methods that own their training (ctx.fit) are not supported for detection cells yet")


def detection_batches(split, r: Recipe, device: torch.device, generator: torch.Generator | None, train: bool):
    """Training (shuffled, drop-last) or evaluation batches of ``(images, targets)``."""
    size = r.batch_size if train else r.eval_batch_size
    return split.batches(size, train=train, device=device, generator=generator, drop_last=train)


def _trainable_targets(targets: list[dict]) -> list[dict]:
    """Targets without crowd regions (torchvision's losses take every box as an object)."""
    out = []
    for t in targets:
        keep = t["iscrowd"] == 0
        out.append({k: (v[keep] if k in ("boxes", "labels", "masks", "area", "iscrowd") else v) for k, v in t.items()})
    return out


def train_detector(
    model: nn.Module,
    method: Method,
    data: DetectionBundle,
    r: Recipe,
    device: torch.device,
    generator: torch.Generator,
    log=lambda metrics, step=None: None,
    state: CellState | None = None,
    report=lambda *args, **kwargs: None,
) -> list[float]:
    """``r.epochs`` epochs of SGD (the recipe's optimiser and schedule) on the summed loss
    dict; returns the mean training loss of each epoch. Raises on a non-finite loss. With a
    ``state``, checkpoints after every epoch and starts from the last one saved there."""
    groups = method.param_groups(model, r) or default_param_groups(model, r.weight_decay, r.wd_on)
    opt = make_optimizer(groups, r)
    steps = max(1, len(data.train) // r.batch_size)
    sched = make_scheduler(opt, r, steps)
    # the per-epoch losses and the seconds spent, what the checkpoint keeps as its history
    saved = restore_stage(state, STAGE, model, opt, sched, generator) if state is not None else None
    progress = saved or {"losses": [], "elapsed": 0.0}
    history: list[float] = progress["losses"]
    step = len(history) * steps
    report("cell_epochs", total=r.epochs, done=len(history))
    for epoch in range(len(history) + 1, r.epochs + 1):
        e0 = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        for images, targets in detection_batches(data.train, r, device, generator, train=True):
            losses = model(images, _trainable_targets(targets))
            loss = sum(losses.values())
            extra = method.extra_loss(model)
            opt.zero_grad(set_to_none=True)
            (loss + extra if extra is not None else loss).backward()
            if r.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            opt.step()
            sched.step()
            step += 1
            method.on_step(model, step)
            total += float(loss.detach())
            n += 1
        mean = total / max(1, n)
        if not math.isfinite(mean):
            raise QbenchError(f"training loss is {mean} (not finite) in epoch {epoch}; lower the learning rate")
        history.append(mean)
        logged = {"train_loss": mean, "lr": opt.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - e0}
        log(logged, step=epoch)
        progress["elapsed"] += time.perf_counter() - e0
        if state is not None:
            save_stage(state, STAGE, model, opt, sched, generator, progress)
        report("epoch", epoch=epoch, total=r.epochs, metrics=logged)
    return history


@torch.no_grad()
def evaluate_detector(model: nn.Module, data: DetectionBundle, r: Recipe, device: torch.device, masks: bool) -> dict:
    """COCO AP (percent) of ``model`` on the test split; NaN where COCO's is undefined."""
    model.eval()

    def outputs() -> Iterator[tuple[int, dict]]:
        for images, targets in detection_batches(data.test, r, device, None, train=False):
            for t, out in zip(targets, model(images), strict=True):
                yield t["image_id"], {k: v.cpu() for k, v in out.items()}

    return coco_metrics(data.test.coco, outputs(), data.label_to_cat, masks=masks)


def build(cell, ctx, tracker, runs, run_id):
    """Data, prepared model, method, its context and the training generator of ``cell``."""
    from .runner import parent_state, prepare_from_parent, tag_notation
    from .tracking import DATA_FINGERPRINT

    r = cell.typed_recipe
    device = torch.device(ctx.device)
    tag_notation(cell, tracker, run_id)
    generator = seed_everything(cell.seed)
    dopts = dict(cell.dataset_options)
    dopts.setdefault("masks", predicts_masks(cell.model))
    data = load_detection_dataset(cell.dataset, ctx.data_root, **dopts)
    tracker.set_tags(run_id, {DATA_FINGERPRINT: data.fingerprint()})
    model = create_detector(cell.model, num_classes=data.num_classes, where=cell.label, **cell.model_options)
    method = get_method(cell.method)(cell.w_bits, cell.a_bits, **cell.options)
    parent = parent_state(cell, ctx, tracker, runs) if cell.parent else None
    from_fp = parent is not None and cell.parent_method == "fp32"
    if from_fp:
        method.load_parent(model, parent, "fp32")

    def log(metrics, step=None):
        tracker.log_metrics(run_id, dict(metrics), step=step)

    mctx = MethodContext(
        device=device,
        recipe=r,
        # methods read ``for x, _ in ctx.calib_batches()``: here x is a list of images
        calib_batches=lambda: detection_batches(data.train, r, device, None, train=False),
        train_batches=lambda: detection_batches(data.train, r, device, generator, train=True),
        log=log,
        evaluate=lambda m: evaluate_detector(m, data, r, device, cell.task == "instance_segmentation"),
        fit=_no_fit,  # type: ignore[arg-type]
        seed=cell.seed,
        cell_id=cell.id,
    )
    model, progressive = prepare_from_parent(cell, model, method, mctx, parent)
    return data, model, method, mctx, generator, progressive


def execute(cell, ctx, tracker, runs: dict, run_id: str, report) -> dict:
    """Run a detection cell and record it; returns its final metrics (the runner's contract)."""
    from .runner import record

    if cell.task == "instance_segmentation" and not predicts_masks(cell.model):
        raise QbenchError(f"task instance_segmentation needs a model that predicts masks, not {cell.model}", cell.label)
    t0 = time.perf_counter()
    data, model, method, mctx, generator, progressive = build(cell, ctx, tracker, runs, run_id)
    r = mctx.recipe
    state = CellState(ctx.cell_dir(cell.id))
    before = elapsed_before(state)  # training time of earlier, killed attempts
    if not progressive:
        method.calibrate(model, mctx)  # a resumed cell's checkpoint then replaces what it set
    if r.train:
        if method.train(model, mctx):
            pass  # the method trained (without ctx.fit, which would have raised)
        else:
            train_detector(model, method, data, r, mctx.device, generator, mctx.log, state, report)
    model = method.finalize(model)
    metrics = finite(evaluate_detector(model, data, r, mctx.device, cell.task == "instance_segmentation"))
    fp = method.footprint(model)
    metrics.update(
        {
            "n_images": float(len(data.test)),
            "size_bytes": fp.total_bytes,
            "fp32_bytes": fp.fp32_bytes,
            "compression_ratio": fp.compression_ratio,
            "bit_audit_ok": float(fp.audit_ok),
            "wall_time_s": before + (time.perf_counter() - t0),
        }
    )
    record(tracker, run_id, metrics, fp, model, ctx.cell_dir(cell.id))
    state.clear()
    return metrics


__all__ = ["TASKS", "evaluate_detector", "execute", "train_detector"]
