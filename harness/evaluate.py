"""``qbench evaluate``: score a trained checkpoint on a dataset and record it like any run.

The checkpoint is either qbench's own (a run's ``checkpoint/model.pt``, a state_dict of
the model prepared by the method) or a paper's released file, which the method imports
when it has an importer (``Method.import_checkpoint(obj, model, where)``, e.g. APoT's
official CIFAR-10 models: a dict with ``state_dict`` and ``module.``-prefixed keys).
Files are read with ``torch.load(weights_only=True)``; one that carries code is refused.

The run goes to MLflow under the suite name given by ``--suite`` (default ``imported``)
with qbench's schema: an evaluation-only cell (``recipe.train: false``) whose identity
includes the checkpoint's SHA-256, the metrics ``top1``, ``top5``, ``test_loss``, the
footprint, ``config.json``, ``environment.json`` and the loaded weights as
``checkpoint/model.pt``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
from qbench.methods.recipe import Recipe

from .errors import QbenchError
from .suite import Cell, parse_bits, parse_option_pairs


@dataclass(frozen=True)
class EvalCell(Cell):
    """A cell that only evaluates a given checkpoint (its hash is part of the identity)."""

    checkpoint_sha256: str = ""
    checkpoint_path: str = ""

    def identity(self) -> dict:
        return {**super().identity(), "checkpoint": self.checkpoint_sha256}

    def config(self) -> dict:
        return {**super().config(), "checkpoint_path": self.checkpoint_path}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> Any:
    """The checkpoint's contents, read safely (:func:`qbench.harness.models.weights.safe_load`:
    tensors and containers only); a missing, corrupt or code-carrying file is a
    :class:`QbenchError` naming it."""
    from .models.weights import safe_load

    p = Path(path)
    if not p.is_file():
        raise QbenchError("checkpoint file not found", str(p))
    return safe_load(p, str(p))


def _looks_foreign(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    if "state_dict" in obj:
        return True
    return any(isinstance(k, str) and k.startswith("module.") for k in obj)


def load_into(model, method, obj: Any, fmt: str, where: str) -> str:
    """Load ``obj`` into the prepared ``model``; returns the format used."""
    import torch
    from qbench.methods import has_importer

    if fmt == "auto":
        fmt = "official" if has_importer(method) and _looks_foreign(obj) else "qbench"
    if fmt == "official":
        method.import_checkpoint(obj, model, where)
        return fmt
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise QbenchError("expected a qbench state_dict (a run's checkpoint/model.pt)", where)
    own = model.state_dict()
    missing = [k for k in own if k not in obj and not k.endswith(".initialized")]
    unexpected = [k for k in obj if k not in own]
    if missing or unexpected:
        raise QbenchError(
            f"the checkpoint does not fit {type(model).__name__} with this method and bits: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}",
            where,
        )
    try:
        model.load_state_dict(obj, strict=False)
    except RuntimeError as e:
        raise QbenchError(" ".join(str(e).split())[:300], where) from None
    return fmt


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    model: str,
    dataset: str,
    method: str = "fp32",
    bits: str = "W32A32",
    options: dict | None = None,
    model_options: dict | None = None,
    dataset_options: dict | None = None,
    data_root: str | None = None,
    split: str = "test",
    batch_size: int = 500,
    device: str | None = None,
    fmt: str = "auto",
    suite: str = "imported",
    out_dir: str | Path = "qbench-out",
    tracking_uri: str | None = None,
    track: bool = True,
    comment: str = "",
) -> dict:
    """Evaluate ``checkpoint``; returns the metrics (and logs them unless ``track`` is off)."""
    import torch
    from qbench.methods import MethodContext, get_method

    from .data import load_dataset
    from .models import create_model
    from .runner import NOTATION, measure, record

    t0 = time.perf_counter()
    path = Path(checkpoint)
    obj = read_checkpoint(path)
    try:
        b = parse_bits(bits)
    except ValueError as e:
        raise QbenchError(str(e), "--bits") from None
    method_cls = get_method(method, "--method")
    if b.w not in method_cls.weight_bits or b.a not in method_cls.act_bits:
        raise QbenchError(f"{method} does not support {b.label}", "--bits")
    try:
        m = method_cls(b.w, b.a, **(options or {}))
    except Exception as e:  # pydantic validation of the method's options
        raise QbenchError(" ".join(str(e).split())[:300], "--option") from None
    data = load_dataset(dataset, data_root, "--dataset", **(dataset_options or {}))
    if split not in data.splits:
        raise QbenchError(f"dataset {dataset} has no split {split!r} (has {sorted(data.splits)})", "--split")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = create_model(
        model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        where="--model",
        **(model_options or {}),
    )
    recipe = Recipe(train=False, eval_batch_size=batch_size, amp=False, channels_last=False)
    ctx = MethodContext(
        device=dev,
        recipe=recipe,
        calib_batches=lambda: data.train.batches(recipe.batch_size, train=False, device=dev),
    )
    net = m.prepare(net, ctx)
    used = load_into(net, m, obj, fmt, str(path))
    net, metrics, fp = measure(net.to(dev), m, data, split, recipe, dev)
    if not track:
        metrics["wall_time_s"] = time.perf_counter() - t0
        return metrics
    from .tracking import Tracker, default_uri

    digest = sha256(path)
    cell = EvalCell(
        suite=suite,
        dataset=dataset,
        model=model,
        method=method,
        w_bits=b.w,
        a_bits=b.a,
        seed=0,
        recipe=recipe.model_dump(),
        dataset_options=dict(dataset_options or {}),
        model_options=dict(model_options or {}),
        options=m.options.model_dump(mode="json"),
        method_version=method_cls.version,
        comment=comment or f"evaluated from {path.name} ({used} format, {split} split)",
        checkpoint_sha256=digest,
        checkpoint_path=str(path.resolve()),
    )
    cell = replace(cell, group=cell.group_of(None))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(tracking_uri or default_uri(out), out / "mlartifacts")
    run_id = tracker.start(cell)
    try:
        tracker.set_tags(
            run_id,
            {
                "qbench.source": "evaluate",
                "qbench.checkpoint_sha256": digest,
                "qbench.split": split,
                **({NOTATION: m.notation()} if m.notation() else {}),
            },
        )
        metrics["wall_time_s"] = time.perf_counter() - t0
        record(tracker, run_id, metrics, fp, net, out / "cells" / cell.id)
    except BaseException as e:
        tracker.finish(run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    tracker.finish(run_id, "done")
    metrics["run_id"] = run_id  # type: ignore[assignment]
    metrics["cell_id"] = cell.id  # type: ignore[assignment]
    return metrics


@click.command("evaluate")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--model", required=True, help="Registered model name (qbench list models).")
@click.option("--dataset", required=True, help="Registered dataset name (qbench list datasets).")
@click.option("--method", default="fp32", show_default=True, help="Method the checkpoint was made with.")
@click.option("--bits", default="W32A32", show_default=True, help="W<bits>A<bits>, e.g. W4A4.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Method option (YAML value).")
@click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE")
@click.option(
    "--dataset-option",
    "dataset_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="e.g. mean=[0.491,0.482,0.447] for a checkpoint trained with other statistics.",
)
@click.option(
    "--data-root",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder holding the datasets.",
)
@click.option("--split", default="test", show_default=True)
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available).")
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "qbench", "official"]),
    help="qbench state_dict, or the paper's released format (the method's importer).",
)
@click.option("--suite", default="imported", show_default=True, help="MLflow experiment to record the run in.")
@click.option("--out", "out", default="qbench-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db).")
@click.option("--no-track", is_flag=True, help="Only print the result; record nothing.")
@click.option("--comment", default="", help="Shown in the leaderboard's comment column.")
def evaluate_cmd(
    checkpoint,
    model,
    dataset,
    method,
    bits,
    options,
    model_options,
    dataset_options,
    data_root,
    split,
    batch_size,
    device,
    fmt,
    suite,
    out,
    tracking_uri,
    no_track,
    comment,
) -> None:
    """Evaluate CHECKPOINT (qbench's or a paper's released file) and record the run."""
    metrics = evaluate_checkpoint(
        checkpoint,
        model=model,
        dataset=dataset,
        method=method,
        bits=bits,
        options=parse_option_pairs(options, "--option"),
        model_options=parse_option_pairs(model_options, "--model-option"),
        dataset_options=parse_option_pairs(dataset_options, "--dataset-option"),
        data_root=data_root,
        split=split,
        batch_size=batch_size,
        device=device,
        fmt=fmt,
        suite=suite,
        out_dir=out,
        tracking_uri=tracking_uri,
        track=not no_track,
        comment=comment,
    )
    click.echo(
        f"{model} {method} {bits} on {dataset}/{split}: top-1 {metrics['top1']:.2f}  "
        f"top-5 {metrics['top5']:.2f}  ({int(metrics['n_images'])} images)"
    )
    if "run_id" in metrics:
        click.echo(f"recorded: suite {suite}, cell {metrics['cell_id']}, MLflow run {metrics['run_id']}")
