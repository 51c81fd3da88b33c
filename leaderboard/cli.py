"""``qbench leaderboard``: the static site, or the table as Markdown, CSV or JSON."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("leaderboard")
@click.option(
    "--out",
    "out",
    default="qbench-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder: the site goes to <out>/site/, exports to <out>/leaderboard.<format>.",
)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "md", "csv", "json"]),
    default="html",
    show_default=True,
    help="html: the static site; md: EasyQuantization's README table; csv/json: every column.",
)
@click.option(
    "--output",
    "output",
    default=None,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Where md/csv/json go ('-' for stdout; default <out>/leaderboard.<format>).",
)
@click.option(
    "--bundle",
    "bundle",
    default=None,
    type=click.Path(file_okay=False),
    help="Results bundle to merge (default: the repository's results/, or $QBENCH_BUNDLE).",
)
@click.option("--no-bundle", is_flag=True, help="Show only the runs of the store, not the results bundle.")
def leaderboard_cmd(
    out: str, tracking_uri: str | None, fmt: str, output: str | None, bundle: str | None, no_bundle: bool
) -> None:
    """Join the MLflow runs (and the results bundle's) with the papers' reported numbers:
    a static site or an export."""
    from qbench.harness.errors import QbenchError
    from qbench.harness.tracking import Tracker, default_uri

    from .bundle import DEFAULT

    if bundle and no_bundle:
        raise QbenchError("--bundle and --no-bundle exclude each other", "--no-bundle")
    chosen = None if no_bundle else (Path(bundle) if bundle else DEFAULT)

    uri = tracking_uri or default_uri(out)
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///") :].split("?", 1)[0]).exists():
        Tracker(uri)  # a 0-byte, damaged or non-MLflow database: one line, exit 2, left as it is
    if fmt == "html":
        from .site import build_site

        index = build_site(uri, out, bundle=chosen)
        click.echo(f"leaderboard: {index.resolve().as_uri()}")
        return
    from .export import to_csv, to_json, to_markdown
    from .table import leaderboard_table

    table = leaderboard_table(uri, bundle=chosen)
    text = {"md": to_markdown, "csv": to_csv, "json": to_json}[fmt](table)
    if output == "-":
        click.echo(text, nl=False)
        return
    path = Path(output) if output else Path(out) / f"leaderboard.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    click.echo(f"leaderboard: {path}")
