"""The static leaderboard site: ``<out>/site/`` opened from disk, no server, no network.

Pages (jinja2 templates in ``templates/``, autoescaped: every string from a run, a
config or a reported file is shown as text):

* ``index.html``: the Classification / Detection / Segmentation tables, with filters
  (dataset, model, method, A/W; kept in the query string, so a filtered view is a link to
  share) and sortable columns in a few lines of inline JavaScript; a row's model shows its
  options and its suite; beside it ``leaderboard.csv``, ``.json`` and ``.md`` (the CLI's
  exports), linked from the page's header;
* ``models/<dataset>--<model>.html``: the rows of one dataset and model, with Pareto
  plots of accuracy vs size and accuracy vs weight bits (SVG drawn here, at build time),
  and, where runs or papers give relative BOPs, accuracy vs relative BOPs (every run a
  point, one marker per method; the papers' points hollow);
* ``runs/<run id>.html``: one run's resolved config, environment, training curves and
  per-layer footprint (bits, bytes, MACs and BOPs of every layer, a chart of its bits); its
  checkpoint (a relative link into a local store, the SHA-256 of a bundled run) and how to
  open it in MLflow (a link on a server, the ``mlflow ui`` command for a local store);
* ``methods.html``: every registered method with its paper, link, comment and status.

A Content-Security-Policy allows only the page's own script (by hash) and no network
request, as a second line of defence behind the escaping.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from . import svg
from .bundle import CHECKPOINT, DEFAULT, load_bundle, merge
from .export import to_csv, to_json, to_markdown
from .methods_info import registered_methods
from .reported import load_reported
from .runs import Run, fetch_runs, public_uri, run_url
from .table import BADGES, MIB, PRIMARY_METRIC, SECTIONS, SIZE_FLAGS, SIZE_TOLERANCE_MB, build_table

TEMPLATES = Path(__file__).resolve().parent / "templates"
SCRIPT = (TEMPLATES / "leaderboard.js").read_text(encoding="utf-8") if (TEMPLATES / "leaderboard.js").exists() else ""


# -- formatting (jinja filters) -----------------------------------------------------------
def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def fmt_num(v: Any, digits: int = 2) -> str:
    return f"{float(v):.{digits}f}" if _finite(v) else ""


def fmt_signed(v: Any, digits: int = 2) -> str:
    return f"{float(v):+.{digits}f}" if _finite(v) else ""


def fmt_sig(v: Any, digits: int = 3) -> str:
    """Significant digits, no exponent for everyday magnitudes (0.00596, 44.6, 1.2e+07)."""
    if not _finite(v):
        return ""
    v = float(v)
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    if 1e-4 <= abs(v) < 1e7:
        return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"
    return f"{v:.{digits}g}"


def fmt_si(v: Any) -> str:
    """1.23e9 -> '1.23 G' (BOPs, MACs)."""
    if not _finite(v):
        return ""
    v = float(v)
    for unit, k in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= k:
            return f"{v / k:.3g} {unit}"
    return f"{v:.3g}"


def fmt_duration(v: Any) -> str:
    if not _finite(v):
        return ""
    s = float(v)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_bytes(v: Any) -> str:
    if not _finite(v):
        return ""
    b = float(v)
    if b >= MIB:
        return f"{b / MIB:.2f} MB"
    if b >= 1024:
        return f"{b / 1024:.1f} kB"
    return f"{b:.0f} B"


def sort_value(v: Any) -> str:
    """What a cell sorts by (``data-v``): numbers as numbers, the rest lower-cased."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (int, float)):
        return repr(float(v)) if math.isfinite(float(v)) else ""
    return str(v or "").lower()


def safe_href(url: Any) -> str:
    """Only http(s) links become links (no ``javascript:`` from a reported file)."""
    url = str(url or "").strip()
    return url if urlparse(url).scheme in ("http", "https") else ""


def break_at_underscores(v: Any) -> Markup:
    """Text that may wrap after each ``_`` (``campaign_<wbr>cifar10_<wbr>gpu``), so a long
    suite or model name does not widen its column; it copies as the same text."""
    return Markup("_<wbr>").join(escape(part) for part in str(v or "").split("_"))


def slug(*parts: str) -> str:
    """A file name for arbitrary names: readable, safe and collision-free."""
    text = "--".join(parts)
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "x"
    return f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        num=fmt_num,
        sig=fmt_sig,
        signed=fmt_signed,
        si=fmt_si,
        duration=fmt_duration,
        bytes=fmt_bytes,
        sv=sort_value,
        href=safe_href,
        wbr=break_at_underscores,
    )
    env.globals.update(finite=_finite, badges=BADGES, size_flags=SIZE_FLAGS, size_tolerance=SIZE_TOLERANCE_MB)
    return env


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


# -- page data ----------------------------------------------------------------------------
def _rows(df: pd.DataFrame, run_pages: dict[str, str], model_pages: dict[tuple[str, str], str]) -> list[dict]:
    rows = []
    for rec in df.to_dict("records"):
        rec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        rec["runs"] = [
            {"seed": s, "page": run_pages.get(rid, ""), "id": rid}
            for rid, s in zip(rec["run_ids"] or [], rec["seeds"] or [], strict=False)
        ]
        rec["model_page"] = model_pages.get((rec["dataset"], rec["model"]), "")
        rec["size_is_reported"] = rec["size_mb"] is None and rec["reported_size_mb"] is not None
        rec["size_shown"] = rec["size_mb"] if rec["size_mb"] is not None else rec["reported_size_mb"]
        rec["cr_shown"] = (
            rec["compression_ratio"] if rec["compression_ratio"] is not None else rec["reported_compression_ratio"]
        )
        rows.append(rec)
    return rows


def _point_tags(rows: list[dict]) -> dict[int, str]:
    """The label each row's points carry on a model page: method and A/W, with the model
    options where the page holds several, and the suite where that still leaves two
    configurations with one label (keyed by ``id(row)``)."""
    several = len({r["model_options"] for r in rows}) > 1
    tags = {
        id(r): f"{r['method']} {r['aw']}" + (f" {r['model_options']}" if several and r["model_options"] else "")
        for r in rows
    }
    configs: dict[str, set] = defaultdict(set)
    for r in rows:
        if r["n"] or r["run_ids"]:
            configs[tags[id(r)]].add(r["group"])
    for r in rows:
        if len(configs[tags[id(r)]]) > 1 and r["suite"]:
            tags[id(r)] += f" ({r['suite']})"
    return tags


def _pareto_plots(rows: list[dict], task: str) -> tuple[Markup, Markup]:
    metric = PRIMARY_METRIC[task]
    rows = [r for r in rows if r["metric"] == metric]
    label = rows[0]["metric_label"] if rows else "accuracy"
    tags = _point_tags(rows)
    by_size: list[svg.Point] = []
    by_bits: list[svg.Point] = []
    seen_rep: set[tuple] = set()
    for r in rows:
        name, tag = f"{r['method']} {r['aw']}", tags[id(r)]
        size = r["size_mb"]
        if r["reproduced"] is not None:
            std = r["std"] if r["std"] is not None else math.nan
            x = size if size is not None else math.nan
            by_size.append(svg.Point(x, r["reproduced"], tag, r["method"], yerr=std, tag=tag))
            if r["w_bits"] is not None:
                by_bits.append(svg.Point(r["w_bits"], r["reproduced"], tag, r["method"], yerr=std, tag=tag))
        key = (r["paper"], r["method"], r["aw"], r["variant"], r["reported"])
        if r["reported"] is not None and key not in seen_rep:
            seen_rep.add(key)
            rep_size = r["reported_size_mb"] if r["reported_size_mb"] is not None else size
            x = rep_size if rep_size is not None else math.nan
            tip = f"{name}, {r['paper'] or 'paper'}" + (f" ({r['variant']})" if r["variant"] else "")
            by_size.append(svg.Point(x, r["reported"], tip, r["method"], hollow=True, tag=f"{name} (paper)"))
            by_bits.append(svg.Point(r["w_bits"], r["reported"], tip, r["method"], hollow=True, tag=f"{name} (paper)"))
    ylabel = f"{label} (%)"
    size_plot = svg.scatter(
        by_size, f"{label} vs model size", "size (MB, log scale)", ylabel, "log10", ybounds=svg.PERCENT
    )
    bits_plot = svg.scatter(
        by_bits, f"{label} vs weight bits", "weight bits (log scale)", ylabel, "log2", ybounds=svg.PERCENT
    )
    return size_plot, bits_plot


def run_rel_bops(run: Run) -> float:
    """A run's relative BOPs (% of the model at 32 x 32 bits): its ``rel_bops`` metric, else
    the ``rel_bops`` of its ``footprint.json``; NaN when it recorded neither."""
    v = run.metrics.get("rel_bops")
    if not _finite(v):
        fp = run.artifacts.get("footprint.json")
        v = fp.get("rel_bops") if isinstance(fp, dict) else None
    return float(v) if _finite(v) else math.nan


def _bops_plot(runs: list[Run], rows: list[dict], task: str) -> Markup | None:
    """Accuracy vs relative BOPs (log x): every finished run of the page a filled point, one
    marker shape and colour per method; the papers' (value, rel_bops) points hollow. None when
    no point has relative BOPs."""
    metric = PRIMARY_METRIC[task]
    points: list[svg.Point] = []
    for run in runs:
        y, x = run.metrics.get(metric), run_rel_bops(run)
        if run.status != "done" or not _finite(y) or not (x > 0):
            continue
        method = run.tag("method")
        aw = run.tag("notation") or f"{run.tag('a_bits')}/{run.tag('w_bits')}"
        tag = f"{method} {aw}"
        points.append(svg.Point(x, float(y), f"{tag} seed {run.seed}", method, tag=tag))
    seen: set[tuple] = set()
    for r in rows:
        x = r.get("reported_rel_bops")
        key = (r["paper"], r["method"], r["aw"], r["variant"], r["reported"])
        if r["metric"] != metric or r["reported"] is None or not _finite(x) or key in seen:
            continue
        seen.add(key)
        name = f"{r['method']} {r['aw']}"
        points.append(svg.Point(float(x), r["reported"], name, r["method"], hollow=True, tag=f"{name} (paper)"))
    if not points:
        return None
    label = next((r["metric_label"] for r in rows if r["metric"] == metric), "accuracy")
    return svg.scatter(
        points,
        f"{label} vs relative BOPs",
        "relative BOPs (% of 32/32 bits, log scale)",
        f"{label} (%)",
        "log10",
        shapes=True,
        xbounds=svg.PERCENT,
        ybounds=svg.PERCENT,
    )


def _curve_gap(run: Run) -> dict | None:
    """Where the test-accuracy curve's last point (the model scored during training, through
    the compiled forward where the recipe compiles) is the last epoch's and differs from
    ``top1`` (the finished model, after the method's finalize step, scored eagerly): the two
    numbers and the gap, for the run page to say why both exist; else None."""
    pts = sorted(run.curves.get("test_top1") or [])
    top1 = run.metrics.get("top1")
    try:
        epochs = int(run.params.get("recipe.epochs", ""))
    except ValueError:
        return None
    if not pts or top1 is None or pts[-1][0] != epochs or abs(pts[-1][1] - top1) < 0.005:
        return None
    return {"epoch": epochs, "curve": pts[-1][1], "top1": top1, "gap": top1 - pts[-1][1]}


def _curve_plots(run: Run) -> list[Markup]:
    c = run.curves
    plots = []
    acc = {
        k: v
        for k, v in (
            ("train", c.get("train_top1")),
            ("test", c.get("test_top1")),
            ("val", c.get("val_top1")),
        )
        if v
    }
    loss = {k: v for k, v in (("train", c.get("train_loss")), ("test", c.get("test_loss"))) if v}
    if acc:
        plots.append(svg.line_chart(acc, "accuracy per epoch", "epoch", "top-1 (%)", ybounds=svg.PERCENT))
    if loss:
        plots.append(svg.line_chart(loss, "loss per epoch", "epoch", "loss", ybounds=svg.NON_NEGATIVE))
    if c.get("lr"):
        plots.append(svg.line_chart({"lr": c["lr"]}, "learning rate", "epoch", "lr", ybounds=svg.NON_NEGATIVE))
    return plots


def _environment(env: Any) -> tuple[list[tuple[str, str]], list[str]]:
    if not isinstance(env, dict):
        return [], []
    pkgs = env.get("packages") or []
    items = [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in env.items() if k != "packages"]
    return items, [str(p) for p in pkgs] if isinstance(pkgs, list) else [str(pkgs)]


#: the fields of one layer of ``footprint.json`` that the run page shows
LAYER_FIELDS = (
    "name",
    "kind",
    "w_bits",
    "a_bits",
    "params",
    "bytes",
    "macs",
    "bops",
    "kept",
    "distinct_max",
    "levels_allowed",
)


def _footprint(fp: Any) -> dict | None:
    """What the run page shows of ``footprint.json``; ``None`` unless it is an object.

    A run may come from anywhere (``qbench import``), so every field may be missing or of
    another type: each layer gets every field the page reads (missing: empty; the page
    tests ``distinct_max`` against none), and the layers that are not objects are left out."""
    if not isinstance(fp, dict):
        return None
    layers = fp.get("layers")
    layers = [
        {k: lay.get(k, None if k == "distinct_max" else "") for k in LAYER_FIELDS}
        for lay in (layers if isinstance(layers, list) else [])
        if isinstance(lay, dict)
    ]
    total = fp.get("bops")
    for lay in layers:  # each layer's part of the model's BOPs, in percent
        b = lay["bops"]
        lay["bops_share"] = 100.0 * float(b) / float(total) if _finite(b) and _finite(total) and total else None
    return {
        "layers": layers,
        "total_bytes": fp.get("total_bytes"),
        "fp32_bytes": fp.get("fp32_bytes"),
        "bops": total,
        "fp32_bops": fp.get("fp32_bops"),
        "rel_bops": fp.get("rel_bops"),
        "audit_ok": fp.get("audit_ok") is True,
        "compression_ratio": fp.get("compression_ratio"),
        "bits_chart": svg.layer_bits_chart(
            [(str(lay["name"]), _bits_value(lay["w_bits"]), _bits_value(lay["a_bits"])) for lay in layers]
        )
        if layers
        else None,
    }


def _bits_value(v: Any) -> float | None:
    return float(v) if not isinstance(v, bool) and _finite(v) else None


#: the exports written beside ``index.html`` (the same text as ``qbench leaderboard --format``)
DOWNLOADS = (
    ("CSV", "leaderboard.csv", to_csv),
    ("JSON", "leaderboard.json", to_json),
    ("Markdown", "leaderboard.md", to_markdown),
)


def _local_store(tracking_uri: str) -> bool:
    """A store on this machine (a SQLite file or a folder), not a tracking server."""
    return bool(tracking_uri) and urlparse(tracking_uri).scheme in ("", "file", "sqlite")


def _checkpoints(tracking_uri: str, runs: list[Run]) -> dict[str, Path]:
    """run id -> the checkpoint file of each run of a local store that keeps it inside its
    own artifact folders (never a path the store points elsewhere)."""
    store_runs = [r for r in runs if r.source == "store"]
    if not store_runs or not _local_store(tracking_uri):
        return {}
    from mlflow.tracking import MlflowClient
    from qbench.harness.transfer import confined_artifact

    client = MlflowClient(tracking_uri=tracking_uri)
    found = {}
    for run in store_runs:
        try:
            path = confined_artifact(tracking_uri, client.get_run(run.run_id).info.artifact_uri, CHECKPOINT)
        except Exception:  # a run the store no longer serves: the page says no checkpoint
            continue
        if path is not None:
            found[run.run_id] = path
    return found


def _mlflow_info(tracking_uri: str, run: Run) -> dict:
    """How to open a run in MLflow: a link on a tracking server; for a local store the
    ``mlflow ui`` command and the run's address in it; a bundled run only has its id."""
    info = {"url": None, "command": None, "ui_path": None}
    if run.source != "store":
        return info
    info["url"] = run_url(tracking_uri, run)
    if _local_store(tracking_uri):
        info["command"] = f"mlflow ui --backend-store-uri {shlex.quote(public_uri(tracking_uri))}"
        info["ui_path"] = f"http://127.0.0.1:5000/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    return info


# -- build --------------------------------------------------------------------------------
def render_site(
    table: pd.DataFrame,
    runs: list[Run],
    site_dir: Path,
    tracking_uri: str = "",
    methods: list[dict] | None = None,
    reported: pd.DataFrame | None = None,
) -> Path:
    """Write the pages of ``table`` (from :func:`~qbench.leaderboard.table.build_table`) and
    ``runs`` into ``site_dir``; returns the path of ``index.html``."""
    env = _env()
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "runs").mkdir(exist_ok=True)
    (site_dir / "models").mkdir(exist_ok=True)
    methods = registered_methods() if methods is None else methods
    shown_uri = public_uri(tracking_uri)
    built = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    common = {
        "csp": _csp(SCRIPT),
        "script": Markup(SCRIPT),
        "tracking_uri": shown_uri,
        "built": built,
    }

    run_pages = {r.run_id: f"runs/{slug(r.run_id)}.html" for r in runs}
    pairs = sorted({(d, m) for d, m in zip(table["dataset"], table["model"], strict=False)}) if len(table) else []
    model_pages = {p: f"models/{slug(*p)}.html" for p in pairs}
    rows = _rows(table, run_pages, model_pages)

    sections = [(name, [r for r in rows if r["section"] == name]) for name in SECTIONS.values()]
    sections = [(name, rs) for name, rs in sections if rs] or [("Classification", [])]
    filters = {
        "dataset": sorted({r["dataset"] for r in rows}),
        "model": sorted({r["model"] for r in rows}),
        "method": sorted({r["method"] for r in rows}),
        "aw": sorted({r["aw"] for r in rows}, key=lambda s: (len(s), s)),
    }
    counts = {
        "rows": len(rows),
        "reproduced": sum(1 for r in rows if r["n"]),
        "runs": len(runs),
        "failed": sum(1 for r in runs if r.status == "failed"),
        "reported": 0 if reported is None else len(reported),
    }
    models_nav = [{"dataset": d, "model": m, "page": p} for (d, m), p in model_pages.items()]
    downloads = []
    for label, name, export in DOWNLOADS:
        (site_dir / name).write_text(export(table), encoding="utf-8")
        downloads.append({"label": label, "file": name})
    (site_dir / "index.html").write_text(
        env.get_template("index.html.j2").render(
            **common,
            root="",
            sections=sections,
            filters=filters,
            counts=counts,
            models_nav=models_nav,
            downloads=downloads,
        ),
        encoding="utf-8",
    )

    for (dataset, model), page in model_pages.items():
        mrows = [r for r in rows if r["dataset"] == dataset and r["model"] == model]
        task = mrows[0]["task"] if mrows else "classification"
        size_plot, bits_plot = _pareto_plots(mrows, task)
        mruns = [r for r in runs if (r.tag("dataset"), r.tag("model")) == (dataset, model)]
        bops_plot = _bops_plot(mruns, mrows, task)
        (site_dir / page).write_text(
            env.get_template("model.html.j2").render(
                **common,
                root="../",
                dataset=dataset,
                model=model,
                rows=mrows,
                section=SECTIONS[task],
                size_plot=size_plot,
                bits_plot=bits_plot,
                bops_plot=bops_plot,
                models_nav=models_nav,
                other_data=sorted({r["data_note"] for r in mrows if r.get("data_note")}),
            ),
            encoding="utf-8",
        )

    by_cell = {(r.experiment, r.cell_id): r for r in runs}
    checkpoints = _checkpoints(tracking_uri, runs)
    for run in runs:
        ckpt = checkpoints.get(run.run_id)
        parent = by_cell.get((run.experiment, run.tag("parent")))
        env_items, packages = _environment(run.artifacts.get("environment.json"))
        config = run.artifacts.get("config.json")
        (site_dir / run_pages[run.run_id]).write_text(
            env.get_template("run.html.j2").render(
                **common,
                root="../",
                run=run,
                model_page=model_pages.get((run.tag("dataset"), run.tag("model")), ""),
                parent_page=run_pages.get(parent.run_id, "") if parent else "",
                parent=parent,
                config=json.dumps(config, indent=2, sort_keys=True) if config is not None else None,
                params=sorted(run.params.items()),
                env_items=env_items,
                packages=packages,
                footprint=_footprint(run.artifacts.get("footprint.json")),
                curves=_curve_plots(run),
                curve_gap=_curve_gap(run),
                metrics=sorted(run.metrics.items()),
                tags=sorted(run.tags.items()),
                mlflow=_mlflow_info(tracking_uri, run),
                shown_uri=shown_uri,
                checkpoint_href=quote(Path(os.path.relpath(ckpt, site_dir / "runs")).as_posix()) if ckpt else "",
                models_nav=models_nav,
            ),
            encoding="utf-8",
        )

    rep_count: dict[str, int] = defaultdict(int)
    if reported is not None:
        for m in reported["method"]:
            rep_count[m] += 1
    run_count: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in runs:
        run_count[r.tag("method")][0 if r.status == "done" else 1] += 1
    mrecs = [
        {
            **m,
            "reported_rows": rep_count.get(m["name"], 0),
            "done": run_count[m["name"]][0],
            "failed": run_count[m["name"]][1],
        }
        for m in methods
    ]
    (site_dir / "methods.html").write_text(
        env.get_template("methods.html.j2").render(
            **common,
            root="",
            methods=mrecs,
            models_nav=models_nav,
        ),
        encoding="utf-8",
    )
    return site_dir / "index.html"


def build_site(tracking_uri: str, out_dir: str | Path, bundle: Path | str | None = DEFAULT) -> Path:
    """Build the leaderboard of ``tracking_uri`` (and of the results ``bundle``, for the cells
    the store does not hold; None: none) into ``<out_dir>/site/``; returns the path of its
    ``index.html``. The previous site is replaced only once the new one is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = merge(fetch_runs(tracking_uri, details=True), load_bundle(bundle))
    reported = load_reported()
    table = build_table(runs, reported)
    site = out / "site"
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=out))
    try:
        render_site(table, runs, tmp, tracking_uri, reported=reported)
        old = None
        if site.exists():
            old = out / f".site-old-{tmp.name[6:]}"
            site.rename(old)
        tmp.rename(site)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return site / "index.html"
