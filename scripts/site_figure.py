"""Save one plot of a built leaderboard site as a standalone SVG (for docs/).

    python scripts/site_figure.py SITE DATASET MODEL FIGURE OUT.svg

SITE is a folder written by ``qbench leaderboard`` (``<out>/site``); FIGURE the class of the
plot's ``<figure>`` on the (DATASET, MODEL) page, e.g. ``bops-plot`` (top-1 vs relative
BOPs). The chart's style rules are copied from the site's own stylesheet, so the file looks
as it does on the page. The figure is the site's, not a second drawing of the same data.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "leaderboard" / "templates" / "base.html.j2"


def chart_style() -> str:
    """The ``svg.chart`` rules of the site's stylesheet, scoped to the standalone file."""
    rules = [line.strip() for line in TEMPLATE.read_text(encoding="utf-8").splitlines()]
    rules = [r.replace("svg.chart", "svg", 1) for r in rules if r.startswith("svg.chart")]
    return "\n".join(r.replace("var(--line)", "#d8dee4") for r in rules)


def extract(site: Path, dataset: str, model: str, figure: str) -> str:
    pages = sorted((site / "models").glob("*.html"))
    page = next((p for p in pages if p.name.startswith(f"{dataset}--{model}-")), None)
    if page is None:
        raise SystemExit(f"{site}/models: no page for {dataset}/{model}")
    html = page.read_text(encoding="utf-8")
    m = re.search(rf'<figure class="{re.escape(figure)}"[^>]*>\s*(<svg\b.*?</svg>)', html, re.S)
    if m is None:
        raise SystemExit(f"{page}: no <figure class={figure!r}> with a chart")
    svg = m.group(1)
    return svg.replace(">", f"><style>\n{chart_style()}\n</style>", 1)


def main(argv: list[str]) -> None:
    if len(argv) != 5:
        raise SystemExit(__doc__)
    site, dataset, model, figure, out = argv
    Path(out).write_text(extract(Path(site), dataset, model, figure) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
