"""Progress: a bar for the suite (cells done of total, ETA) and one for the current
cell's epochs (rich), or plain lines when the output is not a terminal."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """Receives the executor's events; ``plain`` when stdout is not a terminal."""

    def __init__(self, total: int, plain: bool | None = None):
        self.total = total
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self.done = 0
        self.t0 = time.monotonic()
        self.console = Console(highlight=False)
        if not self.plain:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.suite_task = self.progress.add_task("suite", total=total)
            self.cell_task = self.progress.add_task("  epochs", total=1, visible=False)
            self.progress.start()

    def cell_start(self, label: str) -> None:
        if self.plain:
            print(f"[{self.done + 1}/{self.total}] {label}", flush=True)
        else:
            self.progress.update(self.cell_task, description=f"  {label}", total=1, completed=0, visible=True)

    def event(self, kind: str, **kw) -> None:
        if kind == "cell_epochs" and not self.plain:
            self.progress.update(self.cell_task, total=kw["total"], completed=kw["done"])
        elif kind == "epoch":
            m = kw["metrics"]
            if self.plain:
                test = f" test top-1 {m['test_top1']:.2f}" if "test_top1" in m else ""
                print(f"    epoch {kw['epoch']}/{kw['total']} loss {m['train_loss']:.4f}{test}", flush=True)
            else:
                self.progress.update(self.cell_task, completed=kw["epoch"])

    def cell_end(self, label: str, status: str, detail: str = "") -> None:
        self.done += 1
        line = f"    {status}: {label}" + (f" ({detail})" if detail else "")
        if self.plain:
            print(line, flush=True)
        else:
            self.progress.update(self.suite_task, completed=self.done)
            self.progress.update(self.cell_task, visible=False)
            if status != "skipped":
                self.progress.console.print(line)

    def close(self) -> None:
        if not self.plain:
            self.progress.stop()
