"""The leaderboard: MLflow runs (written here through MLflow's client in qbench's schema)
joined with reported numbers; the static site, its escaping, the exports and the command.

The runs' numbers here are inputs chosen to exercise the join (seed statistics, badges,
failed seeds); the browser test (test_browser.py) builds the site from a real training."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Literal

import pandas as pd
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict
from qbench.harness.cli import cli
from qbench.leaderboard import build_site, build_table, leaderboard_table
from qbench.leaderboard.export import to_csv, to_json, to_markdown
from qbench.leaderboard.reported import load_reported
from qbench.leaderboard.runs import fetch_runs
from qbench.leaderboard.site import render_site
from qbench.methods import Method, Paper

XSS = "<script>alert(1)</script>"

REPORTED = textwrap.dedent("""\
    paper: {key: demo, title: "Demo paper", authors: "A. Author", venue: ICLR, year: 2020,
            url: "javascript:alert(2)"}
    rows:
      - {dataset: digits, model: small_cnn, method: lsq, w_bits: 4, a_bits: 4, metric: top1,
         value: 96.0, source: "Table 1"}
      - {dataset: digits, model: small_cnn, method: fp32, w_bits: 32, a_bits: 32, metric: top1,
         value: 99.0, source: "Table 1"}
      - {dataset: cifar10, model: resnet20, method: apot, w_bits: 3, a_bits: 3, metric: top1,
         value: 92.0, source: "Table 2", size_mb: 0.1}
""")


@functools.lru_cache(maxsize=1)
def _empty_db() -> Path:
    """An MLflow sqlite database with its schema created once per test session (creating the
    schema takes seconds; copying the file takes milliseconds)."""
    from mlflow.tracking import MlflowClient

    path = Path(tempfile.mkdtemp(prefix="qbench-mlflow-template-")) / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def new_store_db(folder: Path) -> str:
    """A fresh, empty MLflow sqlite store at ``folder/mlflow.db``; returns its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(_empty_db(), folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


class Store:
    """An MLflow sqlite store in a temp folder, written in qbench's tracking schema."""

    def __init__(self, root: Path):
        from mlflow.tracking import MlflowClient

        self.root = root
        self.uri = new_store_db(root)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.exps: dict[str, str] = {}

    def run(
        self,
        method="lsq",
        w=4,
        a=4,
        seed=0,
        top1=None,
        status="done",
        suite="smoke",
        dataset="digits",
        model="small_cnn",
        name=None,
        comment="",
        tolerance=0.5,
        parent="",
        extra_tags=None,
        cell_id=None,
        metrics=None,
        epochs=3,
        extra_params=None,
    ) -> str:
        from mlflow.entities import Metric, Param, RunTag

        if suite not in self.exps:
            loc = (self.root / "mlartifacts" / suite).resolve().as_uri()
            self.exps[suite] = self.client.create_experiment(suite, artifact_location=loc)
        cid = cell_id or f"{dataset}-{model}-{method}-{w}-{a}-{seed}"
        label = name or f"{dataset}/{model} {method} W{w}A{a} seed {seed}"
        rid = self.client.create_run(self.exps[suite], run_name=label).info.run_id
        tags = {
            "qbench.cell_id": cid,
            "qbench.suite": suite,
            "qbench.method": method,
            "qbench.model": model,
            "qbench.dataset": dataset,
            "qbench.w_bits": str(w),
            "qbench.a_bits": str(a),
            "qbench.seed": str(seed),
            "qbench.code_version": "test",
            "qbench.status": status,
            "qbench.parent": parent,
            "qbench.tolerance": str(tolerance),
            "qbench.comment": comment,
            **(extra_tags or {}),
        }
        config = {
            "id": cid,
            "suite": suite,
            "dataset": dataset,
            "dataset_options": {},
            "model": model,
            "model_options": {},
            "method": method,
            "options": {},
            "w_bits": w,
            "a_bits": a,
            "seed": seed,
            "recipe": {"epochs": epochs, "lr": 0.05},
            "parent": parent or None,
        }
        params = {
            "id": cid,
            "suite": suite,
            "dataset": dataset,
            "dataset_options": "{}",
            "model": model,
            "model_options": "{}",
            "method": method,
            "options": "{}",
            "w_bits": str(w),
            "a_bits": str(a),
            "seed": str(seed),
            "recipe.epochs": str(epochs),
            "recipe.lr": "0.05",
            "parent": parent or "None",
            **(extra_params or {}),
        }
        self.client.log_batch(
            rid,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        self._json(rid, "config.json", config)
        self._json(rid, "environment.json", {"python": "3.11", "torch": "2.x", "packages": ["torch==2"]})
        if status == "done":
            for e in range(1, epochs + 1):
                self.client.log_batch(
                    rid,
                    metrics=[
                        Metric("train_loss", 1.0 / e, 0, e),
                        Metric("train_top1", top1 - 3.0 / e, 0, e),
                        Metric("test_top1", top1 - 2.0 / e, 0, e),
                        Metric("lr", 0.05 / e, 0, e),
                    ],
                )
            size = 10_000.0 * w / 32 + 400
            final = {
                "top1": top1,
                "top5": 99.9,
                "test_loss": 0.1,
                "size_bytes": size,
                "fp32_bytes": 10_400.0,
                "compression_ratio": 10_400.0 / size,
                "bops": 1e6 * w * a,
                "wall_time_s": 3.0,
                "bit_audit_ok": 1.0,
                **(metrics or {}),
            }
            self.client.log_batch(rid, metrics=[Metric(k, float(v), 0, 0) for k, v in final.items()])
            self._json(
                rid,
                "footprint.json",
                {
                    "total_bytes": size,
                    "fp32_bytes": 10_400.0,
                    "bops": 1e6 * w * a,
                    "audit_ok": True,
                    "compression_ratio": 10_400.0 / size,
                    "layers": [
                        {
                            "name": "features.0",
                            "kind": "QuantConv2d",
                            "w_bits": w,
                            "a_bits": a,
                            "params": 288,
                            "bytes": 288 * w / 8 + 8,
                            "macs": 18432,
                            "bops": 18432 * w * a,
                            "distinct_max": min(2**w, 16),
                            "levels_allowed": 2**w,
                        }
                    ],
                },
            )
        elif status == "failed":
            self.client.set_tag(rid, "qbench.error", "RuntimeError: loss is NaN")
        return rid

    def _json(self, rid: str, name: str, obj) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj))
            self.client.log_artifact(rid, str(p))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    s = Store(tmp_path_factory.mktemp("mlflow"))
    for seed, v in enumerate([97.0, 97.5, 98.0]):
        s.run("fp32", 32, 32, seed, v)
    for seed, v in enumerate([96.0, 96.4]):
        s.run(
            "lsq",
            4,
            4,
            seed,
            v,
            parent=f"digits-small_cnn-fp32-32-32-{seed}",
            comment="suite says hi",
        )
    s.run(
        "lsq",
        4,
        4,
        2,
        status="failed",
        parent="digits-small_cnn-fp32-32-32-2",
        comment="suite says hi",
    )
    s.run(
        "lsq",
        2,
        2,
        0,
        80.0,
        name=XSS,
        comment=XSS,
        extra_tags={"qbench.error": XSS},
        parent="digits-small_cnn-fp32-32-32-0",
    )
    s.run("lsq", 3, 3, 0, 90.0, status="running")
    return s


@pytest.fixture(scope="module")
def reported() -> pd.DataFrame:
    return load_reported([("methods/reported/demo.yaml", REPORTED)])


@pytest.fixture(scope="module")
def table(store, reported) -> pd.DataFrame:
    return leaderboard_table(store.uri, reported=reported)


def _row(table, method, aw, dataset="digits"):
    rows = table[(table["method"] == method) & (table["aw"] == aw) & (table["dataset"] == dataset)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_seeds_grouped_mean_std_n(table):
    fp = _row(table, "fp32", "32/32")
    assert fp["reproduced"] == pytest.approx(97.5)
    assert fp["std"] == pytest.approx(0.5)  # sample std (ddof=1) of 97, 97.5, 98
    assert fp["n"] == 3 and fp["n_failed"] == 0 and len(fp["run_ids"]) == 3
    assert fp["seeds"] == ["0", "1", "2"]
    lsq = _row(table, "lsq", "4/4")
    assert lsq["reproduced"] == pytest.approx(96.2) and lsq["n"] == 2
    assert lsq["n_failed"] == 1 and lsq["status"] == "partial"
    assert lsq["errors"] == ["RuntimeError: loss is NaN"]
    assert lsq["size_mb"] == pytest.approx((10_000 * 4 / 32 + 400) / 2**20)
    assert lsq["bops"] == pytest.approx(16e6) and lsq["wall_time_s"] == pytest.approx(3.0)


def test_reported_join_delta_and_badges(table):
    lsq = _row(table, "lsq", "4/4")
    assert lsq["reported"] == 96.0 and lsq["delta"] == pytest.approx(0.2)
    assert lsq["badge"] == "within" and lsq["paper"] == "demo" and lsq["source"] == "Table 1"
    fp = _row(table, "fp32", "32/32")
    assert fp["delta"] == pytest.approx(-1.5) and fp["badge"] == "below"
    two = _row(table, "lsq", "2/2")
    assert math.isnan(two["reported"]) and two["badge"] == "no-reported"
    apot = _row(table, "apot", "3/3", dataset="cifar10")  # reported, never run
    assert apot["n"] == 0 and math.isnan(apot["reproduced"]) and apot["badge"] == "not-run"
    assert apot["reported_size_mb"] == 0.1 and apot["run_ids"] == []


def test_running_runs_are_not_results(table):
    assert not ((table["method"] == "lsq") & (table["aw"] == "3/3")).any()


def test_comment_joins_suite_and_method_comments(table):
    from qbench.methods import METHODS

    lsq = _row(table, "lsq", "4/4")
    assert lsq["suite_comment"] == "suite says hi"
    assert lsq["method_comment"] == METHODS.get("lsq").comment
    assert lsq["comment"].startswith("suite says hi")


def test_sections_and_order(table):
    assert list(table["section"].unique()) == ["Classification"]
    digits = table[table["dataset"] == "digits"]
    assert digits["method"].iloc[0] == "fp32"  # the full-precision row first, as in EasyQuantization


def test_tolerance_above_below_and_tasks(tmp_path):
    s = Store(tmp_path)
    s.run("lsq", 4, 4, 0, 97.0, tolerance=2.0)  # +1.0 vs 96.0: within a tolerance of 2
    s.run("fp32", 32, 32, 0, 99.8)  # +0.8 vs 99.0 with the default 0.5: above
    s.run("lsq", 2, 4, 0, 70.0)  # A/W = 4/2: activations first
    s.run("lqnet", 2, 2, 0, 60.0, extra_tags={"qbench.notation": "ter/ter"})
    s.run("fp32", 32, 32, 0, 0.0, dataset="coco", model="retinanet", metrics={"box_ap": 31.5})
    s.run(
        "fp32",
        32,
        32,
        0,
        0.0,
        dataset="coco",
        model="maskrcnn",
        extra_tags={"qbench.task": "segmentation"},
        metrics={"mask_ap": 30.1},
    )
    t = leaderboard_table(s.uri, reported=load_reported([("methods/reported/demo.yaml", REPORTED)]))
    assert _row(t, "lsq", "4/4")["badge"] == "within" and _row(t, "lsq", "4/4")["tolerance"] == 2.0
    assert _row(t, "fp32", "32/32")["badge"] == "above"
    assert _row(t, "lsq", "4/2")["w_bits"] == 2 and _row(t, "lsq", "4/2")["a_bits"] == 4
    assert _row(t, "lqnet", "ter/ter")["reproduced"] == 60.0
    coco = t[t["dataset"] == "coco"].set_index("model")
    assert coco.loc["retinanet", "section"] == "Detection" and coco.loc["retinanet", "reproduced"] == 31.5
    assert coco.loc["maskrcnn", "section"] == "Segmentation" and coco.loc["maskrcnn", "reproduced"] == 30.1
    assert list(t["section"].unique()) == ["Classification", "Detection", "Segmentation"]


def test_rerun_newest_finished_run_wins(tmp_path):
    s = Store(tmp_path)
    s.run("lsq", 4, 4, 0, status="failed", cell_id="c1")
    s.run("lsq", 4, 4, 0, 95.0, cell_id="c1")
    s.run("lsq", 4, 4, 0, status="failed", cell_id="c1")  # a later failed attempt does not hide it
    runs = fetch_runs(s.uri, details=False)
    assert len(runs) == 1 and runs[0].status == "done"
    t = build_table(runs, load_reported([]), comments={})
    assert t.iloc[0]["n"] == 1 and t.iloc[0]["n_failed"] == 0 and t.iloc[0]["reproduced"] == 95.0


def test_configurations_differing_by_recipe_or_parent_stay_apart(tmp_path):
    s = Store(tmp_path)
    s.run("fp32", 32, 32, 0, 97.0, cell_id="base0")
    s.run("lsq", 4, 4, 0, 95.0, cell_id="a", parent="base0")
    s.run("lsq", 4, 4, 0, 94.0, cell_id="b", parent="base0", epochs=5)  # another recipe
    s.run("lsq", 3, 3, 0, 93.0, cell_id="c3", parent="a")
    s.run("lsq", 3, 3, 0, 92.0, cell_id="d3", parent="base0")  # same recipe, other parent
    t = build_table(fetch_runs(s.uri, details=False), load_reported([]), comments={})
    assert sorted(t[t["aw"] == "4/4"]["reproduced"]) == [94.0, 95.0]
    assert sorted(t[t["aw"] == "3/3"]["reproduced"]) == [92.0, 93.0]


def test_missing_store_is_empty_and_not_created(tmp_path):
    uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    assert fetch_runs(uri) == []
    assert not (tmp_path / "none").exists()
    t = leaderboard_table(uri, reported=load_reported([("methods/reported/demo.yaml", REPORTED)]))
    assert len(t) == 3 and t["n"].eq(0).all()


def test_markdown_export_easyquantization_shape(table):
    md = to_markdown(table)
    lines = md.splitlines()
    assert lines[0] == "### Classification"
    header = [c.strip() for c in lines[2].split("|")]
    assert header == [
        "Dataset",
        "Method",
        "Model",
        "A/W",
        "Reported",
        "Reproduced Top-1",
        "Δ",
        "Comment",
    ]
    assert lines[3].startswith("--- |:---:|")
    row = next(ln for ln in lines if ln.startswith("digits | lsq | small_cnn | 4/4"))
    assert "| 96.00 | 96.20 ± 0.28 (n=2) | +0.20 (within) |" in row
    assert "| 92.00 | - | - |" in next(ln for ln in lines if "| apot |" in ln)
    # pasted into a README, it stays text: a backslash-escaped "<" opens no tag
    assert XSS not in md and "\\<script>alert(1)\\</script>" in md and "&lt;" not in md


def test_markdown_cells_read_as_the_text_they_are():
    from qbench.leaderboard.export import _md_cell

    assert _md_cell("epochs > 0, A & B") == "epochs > 0, A & B"  # no &gt; / &amp; in the Markdown
    assert _md_cell("a|b\nc") == "a\\|b c"
    assert _md_cell("x &gt; y") == "x \\&gt; y"  # shown as typed, not as ">"
    assert _md_cell("<img src=x onerror=alert(1)>") == "\\<img src=x onerror=alert(1)>"


def test_csv_and_json_exports(table):
    import io

    back = pd.read_csv(io.StringIO(to_csv(table)))
    assert len(back) == len(table) and {"reported", "reproduced", "std", "n", "badge"} <= set(back.columns)
    recs = json.loads(to_json(table))
    lsq = next(r for r in recs if r["method"] == "lsq" and r["aw"] == "4/4")
    assert lsq["n"] == 2 and len(lsq["run_ids"]) == 3 and lsq["reported"] == 96.0
    assert next(r for r in recs if r["method"] == "apot")["reproduced"] is None


@pytest.fixture(scope="module")
def site(store, reported, table, tmp_path_factory) -> Path:
    runs = fetch_runs(store.uri, details=True)
    out = tmp_path_factory.mktemp("site")
    render_site(table, runs, out, store.uri, reported=reported)
    return out


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def test_site_pages(site, table):
    from qbench.methods import METHODS

    index = (site / "index.html").read_text()
    assert '<h2 id="classification">Classification</h2>' in index
    assert index.count("<tr data-dataset=") == len(table)
    for col in (
        "Dataset",
        "Method",
        "Model",
        "A/W",
        "Metric",
        "Reported",
        "Reproduced",
        "Δ",
        "Size",
        "Compr.",
        "BOPs",
        "Wall time",
        "Comment",
        "Runs",
    ):
        assert f">{col}<" in index, col
    assert 'class="badge b-within"' in index and 'class="badge b-not-run"' in index
    assert "96.20" in index and "± 0.28" in index and "(n=2)" in index
    assert 'href="javascript:' not in index  # the reported file's javascript: url is no link
    assert "after its last epoch" in index  # which epoch the reproduced number is
    assert index.count('<td class="metric" data-v="top-1">Top-1</td>') == len(table)
    sizes = re.findall(r'<td class="n" data-v="[^"]*">([0-9.]+ [kM]?B)', index)
    assert sizes and all(not s.startswith("0.0") for s in sizes), sizes  # kB or MB by magnitude

    model_pages = list((site / "models").glob("*.html"))
    assert len(model_pages) == 2  # digits/small_cnn and cifar10/resnet20
    digits = next(p.read_text() for p in model_pages if "digits" in p.name)
    assert digits.count("<svg") == 2
    assert digits.count('data-kind="reproduced"') == 2 * 3  # 3 reproduced configurations per plot
    assert 'data-kind="reported"' in digits and 'data-front="reproduced"' in digits

    run_pages = list((site / "runs").glob("*.html"))
    assert len(run_pages) == 7  # every done and failed run, not the running one
    lsq = next(p.read_text() for p in run_pages if "lsq W4A4 seed 0" in p.read_text())
    assert "features.0" in lsq and "QuantConv2d" in lsq and "accuracy per epoch" in lsq
    assert "<polyline" in lsq and "&#34;recipe&#34;" in lsq and "torch==2" in lsq
    assert "after the last epoch" in lsq and "not the best epoch" in lsq

    methods = (site / "methods.html").read_text()
    for name in METHODS.names():
        assert f'data-method="{name}"' in methods


def test_every_link_resolves_and_csp_matches_the_script(site):
    for page in _pages(site):
        html = page.read_text()
        for href in re.findall(r'href="([^"]+)"', html):
            if href.startswith(("http://", "https://")):
                continue
            path, _, fragment = href.partition("#")
            target = (page.parent / path).resolve()
            assert target.exists(), (page.name, href)
            assert not fragment or f'id="{fragment}"' in target.read_text(), (page.name, href)
        scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
        assert len(scripts) == 1, page  # ours only
        digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in html.replace("&#39;", "'")
        assert "src=" not in html.replace('"src=', "")  # nothing loaded from elsewhere


def test_script_injection_renders_as_text(site):
    """A run named, commented and failing with <script> shows the text and runs nothing."""
    pages = _pages(site)
    seen = 0
    for page in pages:
        html = page.read_text()
        assert XSS not in html, page
        assert "alert(1)" not in re.sub(r"&lt;script&gt;alert\(1\)&lt;/script&gt;", "", html), page
        seen += "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert seen >= 2  # the index (comment) and the run page (name, comment, error) show it as text


def test_build_site_end_to_end_and_cli(store, tmp_path):
    index = build_site(store.uri, tmp_path)
    assert index == tmp_path / "site" / "index.html" and index.exists()
    assert len(list((tmp_path / "site" / "runs").glob("*.html"))) == 7
    again = build_site(store.uri, tmp_path)  # a rebuild replaces the site, leaves no temp folders
    assert again.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["site"]

    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "leaderboard",
            "--out",
            str(tmp_path),
            "--tracking-uri",
            store.uri,
            "--format",
            "md",
            "--output",
            "-",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Dataset | Method | Model | A/W | Reported | Reproduced Top-1" in res.output
    assert "97.50 ± 0.50 (n=3)" in res.output
    res = runner.invoke(cli, ["leaderboard", "--out", str(tmp_path), "--tracking-uri", store.uri, "--format", "csv"])
    assert res.exit_code == 0 and (tmp_path / "leaderboard.csv").exists()
    res = runner.invoke(cli, ["leaderboard", "--out", str(tmp_path), "--tracking-uri", store.uri])
    assert res.exit_code == 0 and "site/index.html" in res.output


def test_empty_store_and_no_reported_numbers_still_build(tmp_path):
    empty = build_table([], load_reported([]), comments={})
    assert empty.empty
    index = render_site(empty, [], tmp_path / "site", "sqlite:///nowhere.db", reported=load_reported([]))
    html = index.read_text()
    assert "No runs and no reported numbers yet." in html
    assert (tmp_path / "site" / "methods.html").exists()
    assert to_markdown(empty) == "No runs and no reported numbers.\n"
    assert json.loads(to_json(empty)) == []


def test_tracking_uri_credentials_are_not_published(store, reported, tmp_path):
    runs = fetch_runs(store.uri, details=False)
    table = build_table(runs, reported, comments={})
    uri = "https://alice:s3cret@mlflow.example.org:5000"
    render_site(table, runs, tmp_path, uri, methods=[], reported=reported)
    for page in _pages(tmp_path):
        html = page.read_text()
        assert "s3cret" not in html and "alice" not in html
    assert "https://mlflow.example.org:5000/#/experiments/" in next(
        p.read_text() for p in (tmp_path / "runs").glob("*.html")
    )


# -- product-quantization regimes: notation, and the size beside the paper's ----------------

PQ_REPORTED = textwrap.dedent("""\
    paper: {key: pqdemo, title: "PQ demo", authors: "A. Author", venue: ICLR, year: 2020}
    rows:
      - {dataset: digits, model: small_cnn, method: test_regimes, w_bits: 8, a_bits: 32,
         notation: "small blocks", metric: top1, value: 90.0, source: "Table 1", size_mb: 1.54}
      - {dataset: digits, model: small_cnn, method: test_regimes, w_bits: 8, a_bits: 32,
         notation: "large blocks", metric: top1, value: 80.0, source: "Table 1", size_mb: 1.03}
""")


def test_size_flag_beside_the_papers_size_on_site_and_in_exports(tmp_path):
    import io

    from qbench.leaderboard.table import MIB

    s = Store(tmp_path)
    small, large = ({"qbench.notation": f"{r} blocks"} for r in ("small", "large"))
    # 1.544 MB vs the paper's 1.54: the same to 2 decimals; 1.05 vs 1.03: not
    s.run("test_regimes", 8, 32, 0, 89.0, cell_id="s", extra_tags=small, metrics={"size_bytes": 1.544 * MIB})
    s.run("test_regimes", 8, 32, 0, 79.0, cell_id="l", extra_tags=large, metrics={"size_bytes": 1.05 * MIB})
    s.run("fp32", 32, 32, 0, 97.0)  # no reported size: no flag
    reported = load_reported([("methods/reported/pqdemo.yaml", PQ_REPORTED)])
    t = leaderboard_table(s.uri, reported=reported)
    sm, lg = _row(t, "test_regimes", "small blocks"), _row(t, "test_regimes", "large blocks")
    assert (sm["size_flag"], sm["reported_size_mb"]) == ("match", 1.54)
    assert (lg["size_flag"], lg["reported_size_mb"]) == ("differs", 1.03)
    assert _row(t, "fp32", "32/32")["size_flag"] == ""
    not_run = build_table([], reported, comments={})
    assert list(not_run["size_flag"]) == ["", ""], "a reported size alone flags nothing"

    back = pd.read_csv(io.StringIO(to_csv(t)), keep_default_na=False)
    assert sorted(back["size_flag"]) == ["", "differs", "match"]
    assert {r["aw"]: r["size_flag"] for r in json.loads(to_json(t))}["large blocks"] == "differs"

    runs = fetch_runs(s.uri, details=True)
    index = render_site(t, runs, tmp_path / "site", s.uri, reported=reported).read_text()
    row_html = {
        m.group(1): m.group(0)
        for m in re.finditer(r'<tr data-dataset="digits"[^>]*data-aw="(\w+) blocks".*?</tr>', index, re.S)
    }
    assert sorted(row_html) == ["large", "small"]
    assert "1.54" in row_html["small"] and "paper 1.54" in row_html["small"]
    assert 'class="badge b-size-match"' in row_html["small"] and ">size match<" in row_html["small"]
    assert "1.05" in row_html["large"] and "paper 1.03" in row_html["large"]
    assert 'class="badge b-size-differs"' in row_html["large"] and "+0.0200 MB" in row_html["large"]


class _Regimes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    regime: Literal["small", "large"] = "small"
    fail: bool = False


class RegimesMethod(Method):
    """A product-quantization stand-in: one bit-width, two regimes told apart by notation."""

    name = "test_regimes"
    paper = Paper(title="test", authors="qbench", venue="tests", year=2026)
    Options = _Regimes

    def notation(self) -> str:
        return f"{self.options.regime} blocks"

    def prepare(self, model, ctx):
        if self.options.fail:
            raise RuntimeError("prepare failed on purpose")
        return model


@pytest.fixture
def regimes_method():
    from qbench.methods import METHODS

    METHODS._items[RegimesMethod.name] = RegimesMethod
    yield RegimesMethod
    METHODS._items.pop(RegimesMethod.name, None)


def test_method_notation_tags_the_run_and_picks_its_reported_row(tmp_path, regimes_method):
    """Method.notation() becomes the run's qbench.notation tag, the leaderboard's A/W, and the
    run meets only the reported row of its own regime; a cell failing in prepare keeps it."""
    from qbench.harness.executor import LocalExecutor
    from qbench.harness.progress import Reporter
    from qbench.harness.runner import RunContext
    from qbench.harness.suite import load_suite
    from qbench.harness.tracking import default_uri

    path = tmp_path / "regimes.yaml"
    path.write_text(
        textwrap.dedent("""\
            name: regimes
            defaults:
              seeds: [0]
              recipe: {batch_size: 128, lr: 0.05, calib_batches: 1, epochs: 1}
            experiments:
              - dataset: digits
                model: small_cnn
                model_options: {width: 8}
                methods:
                  - {method: test_regimes, bits: [W8A32], options: {regime: small}}
                  - {method: test_regimes, bits: [W8A32], options: {regime: large, fail: true}}
        """)
    )
    suite = load_suite(path)
    out = tmp_path / "out"
    ctx = RunContext(out_dir=out, tracking_uri=default_uri(out))
    results = LocalExecutor(["cpu"]).run(suite.cells, ctx, Reporter(len(suite.cells)))
    assert [r.status for r in results] == ["done", "done", "failed"], [r.error for r in results]
    assert "prepare failed on purpose" in results[2].error

    runs = {(r.tag("method"), r.status): r for r in fetch_runs(default_uri(out), details=False)}
    assert runs[("test_regimes", "done")].tags["qbench.notation"] == "small blocks"
    assert runs[("test_regimes", "failed")].tags["qbench.notation"] == "large blocks"
    assert "qbench.notation" not in runs[("fp32", "done")].tags, "no notation, no tag"

    reported = load_reported([("methods/reported/pqdemo.yaml", PQ_REPORTED)])
    t = leaderboard_table(default_uri(out), reported=reported)
    ours = t[t["method"] == "test_regimes"]
    assert sorted(ours["aw"]) == ["large blocks", "small blocks"], "one row per regime, not 2 x 2"
    small, large = _row(t, "test_regimes", "small blocks"), _row(t, "test_regimes", "large blocks")
    assert small["reported"] == 90.0 and small["n"] == 1 and math.isfinite(small["reproduced"])
    assert large["reported"] == 80.0 and large["status"] == "failed" and large["badge"] == "failed"


DROPS = """
paper: {key: demo2, title: "Demo 2", authors: "A", venue: "V", year: 2020}
rows:
  - {dataset: cifar10, model: resnet20, method: fp32, w_bits: 32, a_bits: 32, metric: top1,
     value: 92.0, source: "Table 1"}
  - {dataset: cifar10, model: resnet20, method: apot, w_bits: 4, a_bits: 4, metric: top1,
     value: 91.0, source: "Table 1"}
"""


@pytest.mark.parametrize("fmt", ["jpeg", None])
def test_other_images_than_the_papers_compare_drops_not_absolute_numbers(tmp_path, fmt):
    """On the JPEG split (papers: the original images) the badge judges our drop from our own
    full-precision baseline against the paper's drop from its baseline, and the row says
    which data each side used; on the same data it judges the absolute numbers."""
    s = Store(tmp_path / "mlflow")
    extra = {"dataset_options.format": fmt} if fmt else {}
    kw = {"dataset": "cifar10", "model": "resnet20", "extra_params": extra}
    for seed, (fp, q) in enumerate([(90.0, 89.0), (90.2, 89.4)]):
        s.run("fp32", 32, 32, seed, fp, **kw)
        s.run("apot", 4, 4, seed, q, parent=f"cifar10-resnet20-fp32-32-32-{seed}", **kw)
    table = leaderboard_table(s.uri, reported=load_reported([("methods/reported/demo2.yaml", DROPS)]), bundle=None)
    apot = table[table["method"] == "apot"].iloc[0]
    fp32 = table[table["method"] == "fp32"].iloc[0]
    assert apot["delta"] == pytest.approx(89.2 - 91.0)  # the absolute gap is always shown
    assert apot["drop"] == pytest.approx(89.2 - 90.1) and apot["reported_drop"] == pytest.approx(-1.0)
    if fmt == "jpeg":
        assert apot["delta_basis"] == "drop" and apot["badge"] == "within"  # -0.9 vs -1.0
        assert apot["data_note"] == "ours: JPEG split; paper: original images"
        assert fp32["badge"] == "other-data" and fp32["delta_basis"] == "none"
        md = to_markdown(table)
        assert "drop -0.90 vs paper -1.00 (within; ours: JPEG split; paper: original images)" in md
        assert "absolute, not comparable" in md  # the full-precision row
        site = tmp_path / "site"
        render_site(table, fetch_runs(s.uri), site, s.uri, reported=None)
        index = (site / "index.html").read_text()
        assert "drop +" not in index and "drop -0.90" in index and "ours: JPEG split; paper: original images" in index
        (page,) = (site / "models").glob("cifar10--resnet20-*.html")
        # the plots set paper points beside ours: the page says they are not the same data
        assert "Not the same data:</strong> ours: JPEG split; paper: original images" in page.read_text()
    else:
        assert apot["delta_basis"] == "absolute" and apot["badge"] == "below" and apot["data_note"] == ""
        site = tmp_path / "site"
        render_site(table, fetch_runs(s.uri), site, s.uri, reported=None)
        (page,) = (site / "models").glob("cifar10--resnet20-*.html")
        assert "Not the same data" not in page.read_text()


def test_model_options_and_suite_tell_configurations_of_one_model_apart(tmp_path):
    """Rows merge only the seeds of one configuration; two configurations of one model name
    (other model options, or the same options in another suite) are rows of their own that
    show what tells them apart."""
    s = Store(tmp_path)
    w8, w16 = {"model_options.width": "8"}, {"model_options.width": "16"}
    s.run("fp32", 32, 32, 0, 97.0, cell_id="w8-0", extra_params=w8)
    s.run("fp32", 32, 32, 1, 98.0, cell_id="w8-1", extra_params=w8)
    s.run("fp32", 32, 32, 0, 95.0, cell_id="w16-0", extra_params=w16)
    s.run("fp32", 32, 32, 0, 96.0, suite="other", cell_id="w8-0", extra_params=w8)
    runs = fetch_runs(s.uri, details=True)
    t = build_table(runs, load_reported([]), comments={})
    got = sorted(zip(t["suite"], t["model_options"], t["n"], t["reproduced"], strict=True))
    assert got == [("other", "width=8", 1, 96.0), ("smoke", "width=16", 1, 95.0), ("smoke", "width=8", 2, 97.5)]
    assert "| small_cnn (width=16) |" in to_markdown(t)
    index = render_site(t, runs, tmp_path / "site", s.uri, reported=load_reported([]))
    html = index.read_text()
    assert html.count('<span class="opts" title="model options">(width=8)</span>') == 2
    assert html.count('<span class="opts" title="model options">(width=16)</span>') == 1
    assert sorted(re.findall(r'class="muted small suite"[^>]*>([^<]+)</div>', html)) == ["other", "smoke", "smoke"]
    # the model page's points say which configuration each is, the suite where options do not
    page = next((index.parent / "models").glob("*.html")).read_text()
    tags = set(re.findall(r'class="pl" fill="[^"]+" data-tag="([^"]+)"', page))
    assert tags == {"fp32 32/32 width=16", "fp32 32/32 width=8 (smoke)", "fp32 32/32 width=8 (other)"}


def test_the_site_offers_the_exports_for_download(site, table):
    index = (site / "index.html").read_text()
    for name, export in (("leaderboard.csv", to_csv), ("leaderboard.json", to_json), ("leaderboard.md", to_markdown)):
        assert f'href="{name}" download="{name}"' in index
        assert (site / name).read_text(encoding="utf-8") == export(table)


def _axis_range(chart: str, axis: str) -> tuple[float, float]:
    lo, hi = re.search(rf'data-{axis}-axis="([^"]+)"', chart).group(1).split()
    return float(lo), float(hi)


def test_plot_axes_stay_within_what_the_quantity_can_be():
    from qbench.leaderboard import svg

    points = [svg.Point(1.0, 99.7, "a", "a", yerr=0.6), svg.Point(2.0, 97.0, "b", "b")]
    chart = svg.scatter(points, "Top-1 vs size", "size", "Top-1 (%)", "log10", ybounds=svg.PERCENT)
    lo, hi = _axis_range(chart, "y")
    assert 90 <= lo <= 97.0 and hi == 100.0  # padded below, not past 100 % above
    ticks = [float(v) for v in re.findall(r'class="ty" data-v="([^"]+)"', chart)]
    assert ticks and max(ticks) <= 100 and min(ticks) >= lo
    assert "102" not in re.findall(r'class="ty"[^>]*>([^<]+)<', chart)
    free = svg.scatter(points, "Top-1 vs size", "size", "Top-1 (%)", "log10")
    assert _axis_range(free, "y")[1] > 100  # what the bound is for: unbounded, the padding runs past 100

    lr = {"lr": [(1, 0.05), (2, 0.025), (3, 0.0)]}  # a schedule that ends at 0
    lo, hi = _axis_range(svg.line_chart(lr, "learning rate", "epoch", "lr", ybounds=svg.NON_NEGATIVE), "y")
    assert lo == 0.0 and hi >= 0.05
    assert _axis_range(svg.line_chart(lr, "learning rate", "epoch", "lr"), "y")[0] < 0


def test_points_at_one_bit_width_carry_labels_that_do_not_collide():
    from qbench.leaderboard import svg

    # four methods at 4 bits within half a point of each other, and a reported number
    points = [svg.Point(4, 90 + 0.15 * i, f"m{i} 4/4", f"m{i}") for i in range(4)]
    points += [svg.Point(4, 90.2, "m0 4/4, paper", "m0", hollow=True, tag="m0 4/4 (paper)")]
    points += [svg.Point(32, 92.0, "fp32 32/32", "fp32")]
    chart = svg.scatter(points, "Top-1 vs weight bits", "bits", "Top-1 (%)", "log2", ybounds=svg.PERCENT)
    labels = re.findall(r'<text x="([\d.]+)" y="([\d.]+)" class="pl"[^>]*>([^<]+)</text>', chart)
    assert sorted(t for _, _, t in labels) == sorted(p.tag or p.label for p in points)
    boxes = [(float(x), float(y) - svg.LABEL_H, float(x) + svg.LABEL_CHAR_W * len(t), float(y)) for x, y, t in labels]
    for i, a in enumerate(boxes):
        assert svg.M_LEFT <= a[0] and a[2] <= svg.W - svg.M_RIGHT, labels[i]  # inside the plot
        assert all(svg._overlap(a, b) == 0 for b in boxes[i + 1 :]), labels


def test_run_page_links_its_checkpoint_and_says_how_to_open_its_mlflow_run(tmp_path):
    s = Store(tmp_path / "store")
    rid = s.run("fp32", 32, 32, 0, 97.0)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "model.pt"
        p.write_bytes(b"the weights")
        s.client.log_artifact(rid, str(p), "checkpoint")
    index = build_site(s.uri, tmp_path / "out", bundle=None)
    page = next((index.parent / "runs").glob("*.html")).read_text()
    href = re.search(r'<a href="([^"]+)" class="checkpoint-link"', page).group(1)
    assert not href.startswith("/") and (index.parent / "runs" / href).resolve().read_bytes() == b"the weights"
    assert f"mlflow ui --backend-store-uri {s.uri}" in page
    assert f"http://127.0.0.1:5000/#/experiments/{s.exps['smoke']}/runs/{rid}" in page


def test_a_progressive_chain_takes_its_drop_from_the_chains_full_precision_start(tmp_path):
    """APoT's chain FP -> 4 -> 3 bits: the 3-bit row's drop is from the full-precision model
    the chain started from (its grandparent), beside the paper's drop from its own."""
    s = Store(tmp_path / "mlflow")
    kw = {"dataset": "cifar10", "model": "resnet20", "extra_params": {"dataset_options.format": "jpeg"}}
    for seed, (fp, w4, w3) in enumerate([(90.0, 89.0, 88.0), (90.2, 89.4, 88.4)]):
        s.run("fp32", 32, 32, seed, fp, **kw)
        s.run("apot", 4, 4, seed, w4, parent=f"cifar10-resnet20-fp32-32-32-{seed}", **kw)
        s.run("apot", 3, 3, seed, w3, parent=f"cifar10-resnet20-apot-4-4-{seed}", **kw)
    chain = (
        DROPS
        + """  - {dataset: cifar10, model: resnet20, method: apot, w_bits: 3, a_bits: 3, metric: top1,
     value: 90.5, source: "Table 1"}
"""
    )
    table = leaderboard_table(s.uri, reported=load_reported([("methods/reported/demo2.yaml", chain)]), bundle=None)
    w3 = _row(table, "apot", "3/3", dataset="cifar10")
    assert w3["drop"] == pytest.approx(88.2 - 90.1) and w3["reported_drop"] == pytest.approx(-1.5)
    assert w3["delta_basis"] == "drop" and w3["badge"] == "within"  # -1.9 against -1.5, tolerance 0.5


def test_run_page_explains_a_curve_that_ends_off_the_result(tmp_path):
    """When the test curve's last-epoch point (the model during training, compiled where the
    recipe compiles) differs from top1 (the finished model, not compiled), the run page gives
    both numbers and why; when they agree, or the curve stops before the last epoch, it says
    nothing."""
    import dataclasses

    from qbench.leaderboard.site import _curve_gap

    s = Store(tmp_path / "mlflow")
    s.run("lsq", 4, 4, 0, 96.0, epochs=4)  # the fixture's curve ends at 96.0 - 2/4
    table = leaderboard_table(s.uri, reported=load_reported([]), bundle=None)
    runs = fetch_runs(s.uri, details=True)
    render_site(table, runs, tmp_path / "site", s.uri, reported=None)
    (page,) = (tmp_path / "site" / "runs").glob("*.html")
    text = page.read_text()
    assert "curve's point at epoch 4 (95.50) differs from <code>top1</code> (96.00) by +0.50 points" in text
    (run,) = runs
    assert _curve_gap(run) == {"epoch": 4, "curve": 95.5, "top1": 96.0, "gap": 0.5}
    same = dataclasses.replace(run, curves={"test_top1": [(2, 95.0), (4, 96.0)]})
    early = dataclasses.replace(run, curves={"test_top1": [(2, 95.0), (3, 95.2)]})
    assert _curve_gap(same) is None and _curve_gap(early) is None
