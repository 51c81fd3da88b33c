"""The closing results table of ``qbench run``: mean and std over seeds per
(dataset, model, method, bits) of each cell's task metric (top-1 for classification, COCO
box AP for detection, mask AP for instance segmentation)."""

from __future__ import annotations

import statistics
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from .runner import CellResult
from .suite import Suite

#: the metric the table shows per task: (logged key, label)
TASK_METRIC = {
    "classification": ("top1", "top-1"),
    "detection": ("box_ap", "box AP"),
    "instance_segmentation": ("mask_ap", "mask AP"),
}


def aggregate(suite: Suite, results: list[CellResult]) -> list[dict]:
    by_id = {r.cell_id: r for r in results}
    groups: dict[tuple, list] = defaultdict(list)
    for c in suite.cells:
        key, label = TASK_METRIC.get(getattr(c, "task", "classification"), TASK_METRIC["classification"])
        # a cell kept on the reference functions (``fused: false``) is its own row
        method = c.method if c.recipe.get("fused", True) else f"{c.method} (fused: false)"
        groups[(c.dataset, c.model, method, c.bits_label, key, label)].append(by_id.get(c.id))
    rows = []
    for (d, m, meth, bits, key, label), res in groups.items():
        ok = [r.metrics for r in res if r is not None and r.status in ("done", "skipped") and key in r.metrics]
        vals = [x[key] for x in ok]
        rows.append(
            {
                "dataset": d,
                "model": m,
                "method": meth,
                "bits": bits,
                "metric": label,
                "n": len(vals),
                "runs": len(res),
                "mean": statistics.fmean(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None,
                "size_kb": statistics.fmean(x["size_bytes"] for x in ok) / 1e3 if ok else None,
                "ratio": statistics.fmean(x["compression_ratio"] for x in ok) if ok else None,
                "failed": sum(1 for r in res if r is not None and r.status == "failed"),
            }
        )
    return rows


def print_results(suite: Suite, results: list[CellResult]) -> None:
    rows = aggregate(suite, results)
    metrics = sorted({r["metric"] for r in rows}, key=lambda x: [v[1] for v in TASK_METRIC.values()].index(x))
    what = " / ".join(metrics) or "top-1"
    table = Table(title=f"{suite.name}: {what} on the test split (final epoch), mean ± std over seeds")
    cols = ("dataset", "model", "method", "bits", "metric", "%", "n", "size kB", "ratio", "failed")
    for col in cols:
        table.add_column(col, justify="right" if col in ("%", "n", "size kB", "ratio", "failed") else "left")
    for r in rows:
        value = f"{r['mean']:.2f} ± {r['std']:.2f}" if r["mean"] is not None else "-"
        table.add_row(
            r["dataset"],
            r["model"],
            r["method"],
            r["bits"],
            r["metric"],
            value,
            f"{r['n']}/{r['runs']}",
            f"{r['size_kb']:.1f}" if r["size_kb"] is not None else "-",
            f"{r['ratio']:.1f}" if r["ratio"] is not None else "-",
            str(r["failed"]),
        )
    Console(width=130).print(table)
