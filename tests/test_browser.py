"""The leaderboard site in a real browser: Debian's Chromium, headless, driven by playwright.

The site is built by the real pipeline: ``qbench run`` of a tiny suite on scikit-learn's
digits (real training on the CPU: a full-precision baseline and LSQ at W4A4 and W2A2, two
seeds each), whose last step builds ``<out>/site/``. The suite's comment is a script tag,
which must show as text and run nothing.

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
