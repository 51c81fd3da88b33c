"""The closing results table of ``qbench run``: mean and std over seeds per
(dataset, model, method, bits)."""

from __future__ import annotations

import statistics
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from .runner import CellResult
from .suite import Suite


def aggregate(suite: Suite, results: list[CellResult]) -> list[dict]:
    by_id = {r.cell_id: r for r in results}
    groups: dict[tuple, list] = defaultdict(list)
    for c in suite.cells:
        groups[(c.dataset, c.model, c.method, c.bits_label)].append(by_id.get(c.id))
    rows = []
    for (d, m, meth, bits), res in groups.items():
        ok = [r.metrics for r in res if r is not None and r.status in ("done", "skipped") and "top1" in r.metrics]
        top1 = [x["top1"] for x in ok]
        rows.append(
            {
                "dataset": d,
                "model": m,
                "method": meth,
                "bits": bits,
                "n": len(top1),
                "runs": len(res),
                "top1_mean": statistics.fmean(top1) if top1 else None,
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0 if top1 else None,
                "size_kb": statistics.fmean(x["size_bytes"] for x in ok) / 1e3 if ok else None,
                "ratio": statistics.fmean(x["compression_ratio"] for x in ok) if ok else None,
                "failed": sum(1 for r in res if r is not None and r.status == "failed"),
            }
        )
    return rows


def print_results(suite: Suite, results: list[CellResult]) -> None:
    table = Table(title=f"{suite.name}: top-1 on the test split (final epoch), mean ± std over seeds")
    for col in ("dataset", "model", "method", "bits", "top-1 %", "n", "size kB", "ratio", "failed"):
        table.add_column(col, justify="right" if col in ("top-1 %", "n", "size kB", "ratio", "failed") else "left")
    for r in aggregate(suite, results):
        top1 = f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}" if r["top1_mean"] is not None else "-"
        table.add_row(
            r["dataset"],
            r["model"],
            r["method"],
            r["bits"],
            top1,
            f"{r['n']}/{r['runs']}",
            f"{r['size_kb']:.1f}" if r["size_kb"] is not None else "-",
            f"{r['ratio']:.1f}" if r["ratio"] is not None else "-",
            str(r["failed"]),
        )
    Console(width=120).print(table)
