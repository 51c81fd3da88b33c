"""The leaderboard site in a real browser: Debian's Chromium, headless, driven by playwright.

The site is built by the real pipeline: ``qbench run`` of a tiny suite on scikit-learn's
digits (real training on the CPU: a full-precision baseline and LSQ at W4A4 and W2A2, two
seeds each), whose last step builds ``<out>/site/``. The suite's comment is a script tag,
which must show as text and run nothing. The suite's model options (``width: 8``) and its
name show in the Model column. Beside it: a filtered view restored from its URL, the download
links (each file the CLI's export), no horizontal overflow in a 1400 px window, every plot's
axes within its data's range and domain, labels beside the plots' points, and the run page's
links to its checkpoint and its MLflow run.

Skips (with the reason) where /usr/bin/chromium or the playwright package is missing; CI
installs both (``apt-get install -y chromium``; ``pip install playwright``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

CHROMIUM = Path("/usr/bin/chromium")
XSS = "<script>alert(1)</script>"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SUITE = textwrap.dedent(f"""\
    name: browser
    description: a tiny real run for the leaderboard's browser test
    tolerance: 0.5
    defaults:
      seeds: [0, 1]
      recipe: {{batch_size: 32, optimizer: sgd, lr: 0.05, momentum: 0.9, schedule: cosine,
               calib_batches: 2}}
    experiments:
      - dataset: digits
        model: small_cnn
        model_options: {{width: 8}}
        comment: "{XSS}"
        baseline: {{recipe: {{epochs: 3}}}}
        methods:
          - method: lsq
            bits: [W4A4, W2A2]
            recipe: {{epochs: 2, lr: 0.01}}
""")


def _requirements() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (CI installs it: apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``qbench run`` of the tiny suite; returns the site folder its last step built."""
    _requirements()
    from qbench.harness.cli import cli
    from test_leaderboard import new_store_db  # a pre-built empty MLflow schema: saves seconds

    root = tmp_path_factory.mktemp("browser-run")
    suite = root / "browser.yaml"
    suite.write_text(SUITE)
    out = root / "out"
    new_store_db(out)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread
    try:
        res = CliRunner().invoke(cli, ["run", str(suite), "--out", str(out), "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output + repr(res.exception)
    index = out / "site" / "index.html"
    assert index.exists(), res.output
    return index.parent


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    _requirements()
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield ctx
        finally:
            ctx.close()


class Watched:
    """A page with everything that must not happen recorded: console errors, uncaught
    exceptions, dialogs (an injected ``alert``), requests that leave file://."""

    def __init__(self, ctx):
        self.page = ctx.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def check_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], self.dialogs
        outside = [u for u in self.requests if not u.startswith("file://")]
        assert outside == [], outside


@pytest.fixture
def watched(browser_context):
    w = Watched(browser_context)
    yield w
    w.page.close()


def _visible_rows(page, section: str = "Classification"):
    return page.locator(f'section[data-section="{section}"] table.lb tbody tr:visible')


def _column_values(page, index: int) -> list[str]:
    return _visible_rows(page).evaluate_all(f"rows => rows.map(r => r.children[{index}].getAttribute('data-v'))")


def test_index_loads_clean_and_shows_the_runs(site, watched, tmp_path):
    page = watched.page
    page.goto(site.joinpath("index.html").as_uri())
    page.wait_for_load_state("load")
    assert page.title() == "qbench leaderboard"
    assert page.locator("h2#classification").inner_text() == "Classification"
    rows = _visible_rows(page)
    ours = rows.filter(has=page.locator("td", has_text="small_cnn"))
    assert ours.count() == 3  # fp32, lsq 4/4, lsq 2/2: each the mean of its two seeds
    assert all("(n=2)" in t for t in ours.locator("td:nth-child(7)").all_inner_texts())
    # a metric column: a top-5 number never sits unlabelled among top-1 numbers
    header = page.locator('section[data-section="Classification"] table.lb thead th').all_inner_texts()
    assert header[4] == "Metric" and header[5] == "Reported"
    metrics = rows.locator("td.metric").all_inner_texts()
    total = rows.count()
    assert len(metrics) == total and set(metrics) <= {"Top-1", "Top-5"} and "Top-1" in metrics
    assert page.locator("#count").inner_text() == f"{total} of {total} rows shown"  # the script ran
    # which configuration a row is: the model's options and the suite beside the model's name
    models = ours.locator("td.model")
    assert set(models.locator(".opts").all_inner_texts()) == {"(width=8)"}
    assert set(models.locator(".suite").all_inner_texts()) == {"browser"}
    assert page.get_by_text(XSS).count() >= 1  # the comment shows as text ...
    shot = tmp_path / "leaderboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    watched.check_clean()  # ... and ran nothing (no dialog), no error, no request off disk


def test_sorting_changes_the_row_order(site, watched):
    page = watched.page
    page.goto(site.joinpath("index.html").as_uri())
    section = page.locator('section[data-section="Classification"]')
    header = section.locator("th", has_text="Reproduced")
    col = 6  # Dataset, Method, Model, A/W, Metric, Reported, Reproduced
    before = _column_values(page, col)
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "ascending"
    asc = _column_values(page, col)
    nums = [float(v) for v in asc if v]
    assert nums == sorted(nums) and len(nums) >= 3
    assert all(v == "" for v in asc[len(nums) :])  # rows with no reproduced value last
    assert asc != before  # the baseline row came first; it is not the lowest
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "descending"
    desc = [float(v) for v in _column_values(page, col) if v]
    assert desc == sorted(nums, reverse=True)
    section.locator("th", has_text="Method").locator("button").click()
    methods = _column_values(page, 1)
    assert methods == sorted(methods)
    watched.check_clean()


def test_filters_change_the_rows(site, watched):
    page = watched.page
    page.goto(site.joinpath("index.html").as_uri())
    total = _visible_rows(page).count()
    page.select_option('select[data-filter="dataset"]', "digits")
    page.select_option('select[data-filter="method"]', "lsq")
    rows = _visible_rows(page)
    assert rows.count() == 2
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.method)")) == {"lsq"}
    page.select_option('select[data-filter="aw"]', "2/2")
    assert _visible_rows(page).count() == 1
    assert _visible_rows(page).first.get_attribute("data-aw") == "2/2"
    assert page.locator("#count").inner_text() == f"1 of {total} rows shown"
    page.click("#reset")
    assert _visible_rows(page).count() == total
    watched.check_clean()


def test_run_and_model_pages_open(site, watched, tmp_path):
    page = watched.page
    page.goto(site.joinpath("index.html").as_uri())
    row = _visible_rows(page).filter(has=page.locator('td[data-v="lsq"]')).filter(has=page.locator('td[data-v="4/4"]'))
    row.get_by_role("link", name="s0").click()
    page.wait_for_load_state("load")
    assert "/runs/" in page.url
    assert "lsq W4A4 seed 0" in page.locator("h1").inner_text()
    assert page.locator("svg.chart polyline").count() >= 3  # accuracy, loss, lr curves
    layers = page.locator("table.fp tbody tr")
    assert layers.count() >= 2
    assert "QuantConv2d" in layers.first.inner_text() or "QuantLinear" in layers.all_inner_texts()[-1]
    assert '"method": "lsq"' in page.locator("pre").first.inner_text()  # the resolved config
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

    page.get_by_role("link", name="digits / small_cnn").click()
    page.wait_for_load_state("load")
    assert "/models/" in page.url
    charts = page.locator("svg.chart")
    assert charts.count() == 3  # accuracy vs size, accuracy vs bits, accuracy vs relative BOPs
    assert page.locator("figure.bops-plot svg.chart").count() == 1
    assert page.locator('figure:not(.bops-plot) svg.chart circle.pt[data-kind="reproduced"]').count() == 6
    assert page.locator('figure.bops-plot svg.chart [data-kind="reproduced"]').count() >= 2
    page.screenshot(path=str(tmp_path / "model.png"), full_page=True)
    watched.check_clean()


def test_methods_page_lists_every_registered_method(site, watched):
    from qbench.methods import METHODS

    page = watched.page
    page.goto(site.joinpath("methods.html").as_uri())
    names = page.locator("table.methods tbody tr").evaluate_all("rs => rs.map(r => r.dataset.method)")
    assert names == METHODS.names()
    watched.check_clean()


def test_a_filtered_view_is_restored_from_its_url(site, watched, browser_context):
    page = watched.page
    index = site.joinpath("index.html").as_uri()
    page.goto(index + "?method=lsq&aw=2%2F2&model=no-such-model")  # an unknown value: no filter
    assert page.input_value('select[data-filter="method"]') == "lsq"
    assert page.input_value('select[data-filter="aw"]') == "2/2"
    assert page.input_value('select[data-filter="model"]') == ""
    rows = _visible_rows(page)
    total = page.locator('section[data-section="Classification"] table.lb tbody tr').count()
    assert page.locator("#count").inner_text() == f"{rows.count()} of {total} rows shown"
    assert rows.count() >= 1 and set(rows.evaluate_all("rs => rs.map(r => r.dataset.aw)")) == {"2/2"}
    # changing a filter rewrites the URL in place: it is the link to share
    page.select_option('select[data-filter="dataset"]', "digits")
    assert "dataset=digits" in page.url and "method=lsq" in page.url and "aw=2%2F2" in page.url
    shared = page.url
    other = browser_context.new_page()
    try:
        other.goto(shared)
        assert other.input_value('select[data-filter="dataset"]') == "digits"
        assert _visible_rows(other).count() == 1
        assert _visible_rows(other).first.get_attribute("data-aw") == "2/2"
        assert _visible_rows(other).first.get_attribute("data-dataset") == "digits"
    finally:
        other.close()
    page.click("#reset")
    assert "?" not in page.url and _visible_rows(page).count() == total
    watched.check_clean()


def test_download_links_are_the_cli_exports(site, watched):
    import io
    import json

    import pandas as pd
    from qbench.harness.cli import cli
    from qbench.harness.tracking import default_uri

    page = watched.page
    page.goto(site.joinpath("index.html").as_uri())
    links = page.locator("nav.downloads a[download]")
    assert links.evaluate_all("as => as.map(a => a.dataset.format)") == ["csv", "json", "markdown"]
    # each link's target, as the browser resolves it (a site opened from disk: read the file)
    targets = links.evaluate_all("as => as.map(a => [a.dataset.format, a.href])")
    got = {}
    for fmt, url in targets:
        assert url.startswith(site.as_uri() + "/"), url  # beside index.html
        got[fmt] = Path(url.removeprefix("file://")).read_text(encoding="utf-8")
    csv = pd.read_csv(io.StringIO(got["csv"]))
    records = json.loads(got["json"])
    assert len(csv) == len(records) == page.locator("table.lb tbody tr").count()
    assert {"model", "model_options", "suite", "reproduced"} <= set(csv.columns)
    assert "| Reproduced Top-1 |" in got["markdown"] and "small_cnn (width=8)" in got["markdown"]
    # the same text as ``qbench leaderboard --format FORMAT`` of the same store
    for fmt, key in (("csv", "csv"), ("json", "json"), ("md", "markdown")):
        args = ["leaderboard", "--out", str(site.parent), "--tracking-uri", default_uri(site.parent)]
        res = CliRunner().invoke(cli, [*args, "--format", fmt, "--output", "-"])
        assert res.exit_code == 0, res.output
        assert res.output.strip() == got[key].strip(), fmt
    watched.check_clean()


_NO_OVERFLOW = """() => ({
    page: document.scrollingElement.scrollWidth,
    window: window.innerWidth,
    tables: [...document.querySelectorAll("table")].map(t => [t.offsetWidth, t.parentElement.clientWidth]),
})"""


def test_pages_fit_a_1400_px_window(site, watched):
    page = watched.page
    assert page.viewport_size["width"] == 1400
    page.goto(site.joinpath("index.html").as_uri())
    pages = [page.url]
    pages.append(site.joinpath(page.locator("main ul a").first.get_attribute("href")).as_uri())
    pages.append(site.joinpath(_visible_rows(page).locator("td.runs a").first.get_attribute("href")).as_uri())
    for url in pages:
        page.goto(url)
        seen = page.evaluate(_NO_OVERFLOW)
        assert seen["page"] <= seen["window"], (url, seen)  # no horizontal scrolling of the page
        for wide, room in seen["tables"]:
            assert wide <= room, (url, seen)  # and each table fits its column: nothing scrolls in a box
    watched.check_clean()


#: every chart's axes and data (the data attributes the SVG carries) and its tick values
_CHARTS = """charts => charts.map(c => ({
    title: c.getAttribute("aria-label"),
    x: c.dataset.xAxis.split(" ").map(Number),
    y: c.dataset.yAxis.split(" ").map(Number),
    xdata: c.dataset.xData.split(" ").map(Number),
    ydata: c.dataset.yData.split(" ").map(Number),
    xticks: [...c.querySelectorAll("text.tx")].map(t => Number(t.dataset.v)),
    yticks: [...c.querySelectorAll("text.ty")].map(t => Number(t.dataset.v)),
}))"""


def _check_axes(chart: dict) -> None:
    """Each axis covers its data, its ticks lie on it, and it stays within what the
    quantity can be: a percentage within [0, 100], a learning rate or a loss not below 0."""
    title = chart["title"]
    for axis in ("x", "y"):
        lo, hi = chart[axis]
        dmin, dmax = chart[axis + "data"]
        ticks = chart[axis + "ticks"]
        assert lo <= dmin <= dmax <= hi, (title, axis, chart)
        assert ticks and all(lo - 1e-9 <= t <= hi + 1e-9 for t in ticks), (title, axis, chart)
    percent_y = title.startswith(("Top-1", "accuracy"))
    if percent_y:
        assert 0 <= chart["y"][0] and chart["y"][1] <= 100, chart
    if title in ("learning rate", "loss per epoch"):
        assert chart["y"][0] >= 0, chart
    if "relative BOPs" in title:
        assert 0 < chart["x"][0] and chart["x"][1] <= 100, chart


#: each point label's box, and the plot area's, as the browser lays them out
_LABELS = """c => {
    const box = e => { const b = e.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]; };
    return {
        points: [...c.querySelectorAll(".pt")].map(p => p.dataset.tag),
        labels: [...c.querySelectorAll("text.pl")].map(t => [t.dataset.tag, t.textContent, box(t)]),
        plot: box(c.querySelector("rect.plot")),
    };
}"""


def _check_labels(chart: dict, name: str) -> None:
    """Every point's label shows, inside the plot, and no two labels overlap."""
    tags = {t for t, _, _ in chart["labels"]}
    assert chart["points"] and set(chart["points"]) <= tags, (name, chart)
    assert all(tag == text for tag, text, _ in chart["labels"]), name
    px0, py0, px1, py1 = chart["plot"]
    boxes = [b for _, _, b in chart["labels"]]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert px0 - 0.5 <= x0 and x1 <= px1 + 0.5 and py0 - 0.5 <= y0 and y1 <= py1 + 0.5, (name, chart)
        for u0, v0, u1, v1 in boxes[i + 1 :]:
            overlap = min(x1, u1) - max(x0, u0) > 0.5 and min(y1, v1) - max(y0, v0) > 0.5
            assert not overlap, (name, chart["labels"])


def test_plots_keep_their_axes_in_range_and_label_their_points(site, watched):
    page = watched.page
    model_page = next((site / "models").glob("digits--small_cnn-*.html"))
    page.goto(model_page.as_uri())
    charts = page.locator("svg.chart:not(.bits)")
    assert charts.count() == 3
    for chart in charts.evaluate_all(_CHARTS):
        _check_axes(chart)
    for i in range(charts.count()):
        _check_labels(charts.nth(i).evaluate(_LABELS), f"model chart {i}")
    # the seeds of one configuration sit at one relative BOPs: labelled, not unlabelled
    bops = page.locator("figure.bops-plot svg.chart")
    assert bops.locator('text.pl[data-tag="lsq 4/4"]').count() >= 1
    assert bops.locator('.pt[data-tag="lsq 4/4"]').count() == 2

    run_pages = sorted((site / "runs").glob("*.html"))
    page.goto(run_pages[0].as_uri())
    curves = page.locator("svg.chart:not(.bits)").evaluate_all(_CHARTS)
    assert {c["title"] for c in curves} == {"accuracy per epoch", "loss per epoch", "learning rate"}
    for chart in curves:
        _check_axes(chart)
    watched.check_clean()


def test_run_page_links_its_checkpoint_and_mlflow_run(site, watched):
    from qbench.harness.tracking import default_uri

    page = watched.page
    page.goto(site.joinpath("index.html").as_uri())
    row = _visible_rows(page).filter(has=page.locator('td[data-v="lsq"]')).filter(has=page.locator('td[data-v="2/2"]'))
    row.get_by_role("link", name="s1").click()
    page.wait_for_load_state("load")
    href = page.locator("a.checkpoint-link").get_attribute("href")
    assert not href.startswith(("/", "file:"))  # relative: the site and its store move together
    checkpoint = (Path(page.url.removeprefix("file://")).parent / href).resolve()
    assert checkpoint.name == "model.pt" and checkpoint.stat().st_size > 1000
    run_id = page.locator("dd.mlflow code.run-id").inner_text()
    assert checkpoint.parts[-4] == run_id  # <artifacts>/<run id>/artifacts/checkpoint/model.pt
    command = page.locator("dd.mlflow code.mlflow-ui").inner_text()
    assert command == f"mlflow ui --backend-store-uri {default_uri(site.parent)}"
    assert run_id in page.locator("dd.mlflow").inner_text().split("then", 1)[1]  # its address in the UI
    watched.check_clean()
