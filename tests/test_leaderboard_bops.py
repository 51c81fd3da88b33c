"""Relative BOPs on the leaderboard: the table's rel_bops beside the paper's, the
(dataset, model) page's plot of accuracy vs relative BOPs (every run a point, one marker per
method, the papers' points hollow) and the run page's per-layer bits, BOPs and bits chart.

Runs are fabricated through MLflow's client in qbench's schema (test_leaderboard.Store); the
reported numbers are the real methods/reported/bayesian_bits.yaml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from qbench.leaderboard import build_table
from qbench.leaderboard.reported import load_reported
from qbench.leaderboard.runs import fetch_runs
from qbench.leaderboard.site import render_site
from test_leaderboard import XSS, Store

BB_FILE = Path(__file__).resolve().parents[1] / "methods" / "reported" / "bayesian_bits.yaml"

# a learned mixed-precision VGG: the first layer at 8 bits on 8-bit input, a pruned
# layer (0 bits), a layer keeping half its channels, the classifier in full precision
LAYERS = [
    ("features.0", 8, 8, 1.0, 3456, 3_538_944),
    ("features.1", 4, 4, 0.5, 147456, 150_994_944),
    ("features.3", 0, 4, 0.0, 294912, 75_497_472),
    (XSS, 2, 2, 1.0, 589824, 75_497_472),
    ("classifier.1", 32, 32, 1.0, 10240, 10240),
]


def _footprint() -> dict:
    layers = [
        {
            "name": name,
            "kind": "QuantConv2d",
            "w_bits": w,
            "a_bits": a,
            "params": params,
            "bytes": params * w * kept / 8 + 4,
            "macs": macs,
            "bops": round(macs * w * a * kept),
            "kept": kept,
            "distinct_max": None,
            "levels_allowed": None,
        }
        for name, w, a, kept, params, macs in LAYERS
    ]
    bops = sum(lay["bops"] for lay in layers)
    fp32 = sum(lay["macs"] for lay in layers) * 1024
    return {
        "total_bytes": 1e5,
        "fp32_bytes": 1e6,
        "bops": bops,
        "fp32_bops": fp32,
        "rel_bops": 100 * bops / fp32,
        "audit_ok": True,
        "compression_ratio": 10.0,
        "layers": layers,
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("mlflow-bops"))
    cifar = dict(dataset="cifar10", model="vgg7")
    bb = {}
    for seed, (top1, rel) in enumerate([(93.0, 0.55), (92.6, 0.47)]):
        bb[seed] = s.run(
            "bayesian_bits",
            32,
            32,
            seed,
            top1,
            extra_tags={"qbench.notation": "mu=0.01"},
            metrics={"rel_bops": rel},
            **cifar,
        )
    s._json(bb[0], "footprint.json", _footprint())  # replaces the store's default one
    s.run("bayesian_bits", 32, 32, 2, status="failed", extra_tags={"qbench.notation": "mu=0.01"}, **cifar)
    # an older run: no rel_bops metric, the figure only in its footprint.json
    lsq = s.run("lsq", 4, 4, 0, 91.0, **cifar)
    s._json(lsq, "footprint.json", {**_footprint(), "rel_bops": 1.5625})
    s.run("lsq", 4, 4, 0, 96.0)  # digits/small_cnn: nothing has relative BOPs there
    reported = load_reported([("methods/reported/bayesian_bits.yaml", BB_FILE.read_text())])
    runs = fetch_runs(s.uri, details=True)
    table = build_table(runs, reported, comments={})
    site = tmp_path_factory.mktemp("site-bops")
    render_site(table, runs, site, s.uri, methods=[], reported=reported)
    return table, site, runs


def _model_page(site: Path, dataset: str) -> str:
    return next(p.read_text() for p in (site / "models").glob("*.html") if p.name.startswith(dataset))


def test_table_joins_rel_bops_with_the_row_of_the_same_mu(built):
    table, _, _ = built
    rows = table[(table["method"] == "bayesian_bits") & (table["dataset"] == "cifar10")]
    mine = rows[rows["n"] > 0].iloc[0]
    assert mine["aw"] == "mu=0.01" and mine["reported"] == 93.23 and mine["reported_rel_bops"] == 0.51
    assert mine["reproduced"] == pytest.approx(92.8) and mine["rel_bops"] == pytest.approx(0.51)
    other = rows[rows["n"] == 0].iloc[0]  # mu=0.1: reported, not run
    assert other["aw"] == "mu=0.1" and other["reported_rel_bops"] == 0.29 and other["badge"] == "not-run"
    mnist = table[table["dataset"] == "mnist"].iloc[0]
    assert (mnist["model"], mnist["reported"], mnist["reported_rel_bops"]) == ("lenet5", 99.30, 0.36)


def test_model_page_plots_accuracy_against_relative_bops(built):
    _, site, _ = built
    page = _model_page(site, "cifar10")
    assert page.count("<svg") == 3 and 'class="bops-plot"' in page
    plot = page.split('class="bops-plot"', 1)[1].split("</svg>", 1)[0]
    assert "Top-1 vs relative BOPs" in plot and "log scale" in plot
    # every finished run a point (two bayesian_bits seeds, one lsq), not the failed seed
    assert plot.count('data-kind="reproduced"') == 3
    assert plot.count('data-kind="reported"') == 2  # mu=0.01 and mu=0.1 from the README
    assert "at 0.29</title>" in plot and "at 0.51</title>" in plot
    assert "bayesian_bits mu=0.01 seed 1 (reproduced): 92.6 at 0.47</title>" in plot
    assert "lsq 4/4 seed 0 (reproduced): 91 at 1.56</title>" in plot  # from footprint.json
    # one marker shape per method: bayesian_bits circles, lsq squares (legend included)
    lsq_points = re.findall(r'<rect [^>]*data-marker="square"[^>]*data-kind="reproduced"', plot)
    assert len(lsq_points) == 1
    assert re.search(r'<circle [^>]*data-kind="reproduced"', plot)
    # the x axis is logarithmic: decades and their 2x, 5x
    ticks = re.findall(r'text-anchor="middle">([0-9.]+)</text>', plot)
    assert {"0.5", "1"} <= set(ticks)
    assert "paper 0.51%" in page and "0.51%" in page  # the table's BOPs cell


def test_page_without_relative_bops_has_no_bops_plot(built):
    _, site, _ = built
    page = _model_page(site, "digits")
    assert page.count("<svg") == 2 and "bops-plot" not in page


def test_run_page_shows_each_layers_bits_and_bops(built):
    _, site, runs = built
    run = next(r for r in runs if r.tag("method") == "bayesian_bits" and r.seed == "0")
    page = next(p.read_text() for p in (site / "runs").glob("*.html") if run.run_id in p.read_text())
    fp = _footprint()
    assert f'<span class="rel-bops">{fp["rel_bops"]:.3g}%</span>' in page
    table = page.split('<table class="fp">', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + len(LAYERS)  # header and one row per layer
    assert "<code>features.3</code>" in table and "(50% kept)" in table
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in table
    share = 100 * fp["layers"][1]["bops"] / fp["bops"]
    assert f'<td class="n">{share:.2f}</td>' in table
    pruned_row = table.split("<code>features.3</code>", 1)[1].split("</tr>", 1)[0]
    assert '<td class="n">0</td>' in pruned_row  # 0 weight bits, 0 BOPs
    chart = page.split('class="chart bits"', 1)[1].split("</svg>", 1)[0]
    assert chart.count('data-role="W"') == chart.count('data-role="A"') == len(LAYERS)
    assert 'data-role="W" data-bits="0"' in chart and 'data-role="A" data-bits="32"' in chart
    assert "&lt;script&gt;" in chart and "<script>" not in chart
