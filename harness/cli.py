"""The ``qbench`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import QbenchError

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "suites" / "smoke.yaml"
DEFAULT_OUT = "qbench-out"


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QbenchError as e:
            click.echo(f"qbench: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qbench")
def cli() -> None:
    """qbench: a benchmark leaderboard and reproducibility harness for quantization."""


def out_option(f):
    return click.option(
        "--out", "out", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False),
        help="Output folder: MLflow store, cell checkpoints, leaderboard site.",
    )(f)


def tracking_option(f):
    return click.option(
        "--tracking-uri", default=None,
        help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db).",
    )(f)


@cli.command("list")
@click.argument("what", type=click.Choice(["methods", "models", "datasets"]))
def list_cmd(what: str) -> None:
    """List the registered methods (with their papers), models or datasets."""
    if what == "methods":
        from qbench.methods import METHODS

        for name, cls in METHODS.items():
            paper = cls.paper.cite() if cls.paper and cls.paper.year else "-"
            click.echo(f"{name:10s} {paper}")
    elif what == "models":
        from .models import MODELS

        for name, fn in MODELS.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            click.echo(f"{name:18s} {doc[0] if doc else ''}")
    else:
        from .data import DATASETS

        for name, fn in DATASETS.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            click.echo(f"{name:18s} {doc[0] if doc else ''}")


# --- commands from other modules are added here (one line each) -----------------------
from qbench.leaderboard.cli import leaderboard_cmd  # noqa: E402  (cheap: click only)

cli.add_command(leaderboard_cmd)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
