"""The leaderboard table: reproduced runs joined with the papers' reported numbers.

One row per (configuration, reported number): the seeds of one resolved configuration
(everything but the seed, within one suite) are one group, summarised as mean, standard
deviation (ddof=1) and n over its finished seeds (its ``suite`` and ``model_options`` tell
two configurations of one model name apart); a group meets every reported row of the same dataset,
model, method and W/A bits whose metric belongs to its task. A reported number with no
run gets a row with an empty Reproduced; a group with no reported number gets a row with
the badge ``no-reported``.

The delta is reproduced minus reported, in points; the badge compares it with the
suite's tolerance (run tag ``qbench.tolerance``, default 0.5 points): ``within``
(|delta| <= tolerance), ``above``, ``below``; without a number on one side: ``no-reported``,
``not-run`` (reported, nothing reproduced) or ``failed`` (every seed failed).

A/W is written as EasyQuantization does: activation bits / weight bits (``2/2``, ``32/32``),
or the ``notation`` of the reported row or the run's ``qbench.notation`` tag (``ter/ter``).

``size_flag`` sets the reproduced size beside the paper's (``size_mb`` vs
``reported_size_mb``, MB = 2^20 bytes): ``match`` when they differ by at most
:data:`SIZE_TOLERANCE_MB` (the papers print sizes to 2 decimals), ``differs`` otherwise,
empty when either is missing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .bundle import DEFAULT, load_bundle, merge
from .reported import METRICS, load_reported
from .runs import Run, fetch_runs

DEFAULT_TOLERANCE = 0.5
SECTIONS = {
    "classification": "Classification",
    "detection": "Detection",
    "segmentation": "Segmentation",
}
PRIMARY_METRIC = {"classification": "top1", "detection": "box_ap", "segmentation": "mask_ap"}
BADGES = {
    "within": "within tolerance",
    "above": "above reported",
    "below": "below reported",
    "no-reported": "no reported value",
    "not-run": "not reproduced yet",
    "failed": "failed",
    "other-data": "different data, no baselines to compare drops",
}
#: datasets whose papers used other images than a run may read: the run's
#: ``dataset_options.format`` -> what it says about the data (papers: the original images)
DATA_VARIANTS = {"jpeg": "JPEG split"}
MIB = 2**20  # the papers' "MB" (a ResNet-18 at 32 bits is 44.6 MB)
#: half the last printed digit of a paper's "1.54 MB": closer than this is the same size
SIZE_TOLERANCE_MB = 0.005
SIZE_FLAGS = {"match": "the paper's size, to its 2 decimals", "differs": "not the paper's size"}

COLUMNS = [
    "section",
    "task",
    "dataset",
    "method",
    "model",
    "model_options",
    "aw",
    "w_bits",
    "a_bits",
    "metric",
    "metric_label",
    "reported",
    "reproduced",
    "std",
    "n",
    "n_failed",
    "delta",
    "badge",
    "fp_reproduced",
    "drop",
    "reported_fp",
    "reported_drop",
    "delta_basis",
    "data_note",
    "tolerance",
    "size_mb",
    "compression_ratio",
    "bops",
    "rel_bops",
    "wall_time_s",
    "top5",
    "bit_audit_ok",
    "comment",
    "reported_comment",
    "suite_comment",
    "method_comment",
    "paper",
    "paper_cite",
    "paper_url",
    "source",
    "variant",
    "reported_size_mb",
    "size_flag",
    "reported_compression_ratio",
    "reported_rel_bops",
    "suite",
    "group",
    "status",
    "runs_from",
    "run_ids",
    "seeds",
    "errors",
]


def aw_notation(a_bits: int | None, w_bits: int | None, notation: str = "") -> str:
    """EasyQuantization's A/W column: activation bits / weight bits, or an explicit notation."""
    if notation:
        return notation
    a = "?" if a_bits is None else str(a_bits)
    w = "?" if w_bits is None else str(w_bits)
    return f"{a}/{w}"


def run_task(run: Run) -> str:
    """The task of a run: the ``qbench.task`` tag, else what it measured, else its dataset."""
    task = run.tag("task")
    if task in SECTIONS:
        return task
    if "mask_ap" in run.metrics:
        return "segmentation"
    if "box_ap" in run.metrics or run.tag("dataset").lower().startswith("coco"):
        return "detection"
    return "classification"


def model_options_text(run: Run) -> str:
    """A run's model options as ``key=value`` pairs (``width=8``); empty for the model's
    defaults. Two configurations of one model name are told apart by it on the site."""
    prefix = "model_options."
    pairs = sorted((k[len(prefix) :], v) for k, v in run.params.items() if k.startswith(prefix))
    return ", ".join(f"{k}={v}" for k, v in pairs)


def method_comments() -> dict[str, str]:
    """``comment`` of every registered method (its stated deviations from the paper)."""
    from .methods_info import registered_methods

    return {m["name"]: m["comment"] for m in registered_methods()}


@dataclass
class _Group:
    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.status == "done"]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "failed"]

    def stat(self, key: str) -> tuple[float, float, int]:
        vals = [r.metrics[key] for r in self.done if key in r.metrics and math.isfinite(r.metrics[key])]
        if not vals:
            return math.nan, math.nan, 0
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
        return float(np.mean(vals)), std, len(vals)

    def mean(self, key: str) -> float:
        return self.stat(key)[0]


def _join_comment(*parts: str) -> str:
    seen: list[str] = []
    for p in parts:
        p = (p or "").strip()
        if p and p not in seen:
            seen.append(p)
    return " · ".join(seen)


def size_flag(size_mb: float, reported_size_mb: float) -> str:
    """``match`` (within :data:`SIZE_TOLERANCE_MB`), ``differs``, or ``""`` without both sizes."""
    try:
        a, b = float(size_mb), float(reported_size_mb)
    except (TypeError, ValueError):
        return ""
    if not (math.isfinite(a) and math.isfinite(b)):
        return ""
    return "match" if abs(a - b) <= SIZE_TOLERANCE_MB + 1e-9 else "differs"


def _badge(delta: float, tolerance: float) -> str:
    if abs(delta) <= tolerance + 1e-9:
        return "within"
    return "above" if delta > 0 else "below"


def _group_row(g: _Group, comments: dict[str, str]) -> dict:
    r = g.first
    task = run_task(r)
    size = g.mean("size_bytes")
    tol = r.tolerance
    ordered = sorted(g.runs, key=lambda x: (x.seed.zfill(6), x.run_id))
    audit = [x.metrics.get("bit_audit_ok") for x in g.done if "bit_audit_ok" in x.metrics]
    return {
        "section": SECTIONS[task],
        "task": task,
        "dataset": r.tag("dataset"),
        "method": r.tag("method"),
        "model": r.tag("model"),
        "model_options": model_options_text(r),
        "w_bits": r.bits("w"),
        "a_bits": r.bits("a"),
        "aw": aw_notation(r.bits("a"), r.bits("w"), r.tag("notation")),
        "tolerance": DEFAULT_TOLERANCE if tol is None else tol,
        "size_mb": size / MIB if math.isfinite(size) else math.nan,
        "compression_ratio": g.mean("compression_ratio"),
        "bops": g.mean("bops"),
        "rel_bops": g.mean("rel_bops"),
        "wall_time_s": g.mean("wall_time_s"),
        "top5": g.mean("top5"),
        "bit_audit_ok": (all(a == 1.0 for a in audit) if audit else None),
        "suite_comment": next((x.tag("comment") for x in g.runs if x.tag("comment")), ""),
        "method_comment": comments.get(r.tag("method"), ""),
        "suite": r.experiment,
        "group": r.group,
        "status": "done" if not g.failed else ("failed" if not g.done else "partial"),
        "runs_from": _runs_from(g.runs),
        "data_variant": DATA_VARIANTS.get(r.params.get("dataset_options.format", ""), ""),
        "run_ids": [x.run_id for x in ordered],
        "seeds": [x.seed for x in ordered],
        "errors": [x.tag("error") for x in ordered if x.status == "failed"],
        "n_failed": len(g.failed),
    }


def _fp_ancestor(run: Run, by_cell: dict[str, Run]) -> Run | None:
    """The full-precision run a run descends from: its parent, or up a progressive chain
    (APoT's FP -> 4 -> 3 -> 2 bits) to the chain's start; None if there is none in the store."""
    seen: set[str] = set()
    while (p := run.tag("parent")) in by_cell and p not in seen:
        seen.add(p)
        run = by_cell[p]
        if run.tag("method") == "fp32":
            return run
    return None


def _baseline_group(members: list[Run], by_cell: dict[str, Run], groups: dict[str, list[Run]]) -> _Group | None:
    """The full-precision group the runs of one configuration descend from (their parents',
    or their chain's start), when that is one fp32 configuration; else None."""
    roots = {a.group for r in members if (a := _fp_ancestor(r, by_cell)) is not None}
    if len(roots) != 1:
        return None
    return _Group(groups[roots.pop()])


def _reported_baselines(reported: pd.DataFrame) -> dict[tuple, float]:
    """(paper, dataset, model, metric) -> that paper's full-precision number."""
    out: dict[tuple, float] = {}
    for _, rep in reported[reported["method"] == "fp32"].iterrows():
        out.setdefault((rep["paper"], rep["dataset"], rep["model"], rep["metric"]), float(rep["value"]))
    return out


def _runs_from(runs: list[Run]) -> str:
    """``bundle`` (every run from the repository's results bundle), ``store`` (the user's
    own store) or ``mixed``."""
    sources = {r.source for r in runs}
    return sources.pop() if len(sources) == 1 else "mixed"


def _empty_run_fields() -> dict:
    return {
        "model_options": "",
        "size_mb": math.nan,
        "compression_ratio": math.nan,
        "bops": math.nan,
        "rel_bops": math.nan,
        "wall_time_s": math.nan,
        "top5": math.nan,
        "bit_audit_ok": None,
        "suite_comment": "",
        "suite": "",
        "group": "",
        "status": "not run",
        "runs_from": "",
        "data_variant": "",
        "run_ids": [],
        "seeds": [],
        "errors": [],
        "n_failed": 0,
        "tolerance": DEFAULT_TOLERANCE,
    }


def _reported_fields(rep: pd.Series | None) -> dict:
    if rep is None:
        return {
            "reported": math.nan,
            "reported_comment": "",
            "paper": "",
            "paper_cite": "",
            "paper_url": "",
            "source": "",
            "variant": "",
            "reported_size_mb": math.nan,
            "reported_compression_ratio": math.nan,
            "reported_rel_bops": math.nan,
        }
    return {
        "reported": rep["value"],
        "reported_comment": rep["comment"],
        "paper": rep["paper"],
        "paper_cite": rep["paper_cite"],
        "paper_url": rep["paper_url"],
        "source": rep["source"],
        "variant": rep["variant"],
        "reported_size_mb": rep["size_mb"],
        "reported_compression_ratio": rep["compression_ratio"],
        "reported_rel_bops": rep["rel_bops"],
    }


def build_table(runs: list[Run], reported: pd.DataFrame, comments: dict[str, str] | None = None) -> pd.DataFrame:
    """Join run groups with reported rows (see the module docstring); one DataFrame."""
    comments = method_comments() if comments is None else comments
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.group].append(r)

    by_key: dict[tuple, list[int]] = defaultdict(list)
    for i, rep in reported.iterrows():
        by_key[(rep["dataset"], rep["model"], rep["method"], int(rep["w_bits"]), int(rep["a_bits"]))].append(i)
    matched: set[int] = set()
    rows: list[dict] = []
    by_cell = {r.cell_id: r for r in runs}
    for members in groups.values():
        g = _Group(members)
        base = _group_row(g, comments)
        fp_group = _baseline_group(members, by_cell, groups)
        notation = g.first.tag("notation")
        candidates = [
            i
            for i in by_key.get((base["dataset"], base["model"], base["method"], base["w_bits"], base["a_bits"]), [])
            if METRICS[reported.at[i, "metric"]][0] == base["task"] or reported.at[i, "task"] == base["task"]
        ]
        # an explicit notation on both sides (ter/ter vs 2/2) must agree
        candidates = [
            i
            for i in candidates
            if not (notation and reported.at[i, "notation"] and reported.at[i, "notation"] != notation)
        ]
        for i in candidates or [None]:
            rep = reported.loc[i] if i is not None else None
            metric = rep["metric"] if rep is not None else PRIMARY_METRIC[base["task"]]
            mean, std, n = g.stat(metric)
            row = {
                **base,
                **_reported_fields(rep),
                "metric": metric,
                "metric_label": METRICS[metric][1],
                "reproduced": mean,
                "std": std,
                "n": n,
                "fp_reproduced": fp_group.stat(metric)[0] if fp_group is not None else math.nan,
            }
            if rep is not None:
                matched.add(i)
                if rep["notation"] and not notation:
                    row["aw"] = rep["notation"]
            rows.append(row)

    for i, rep in reported.iterrows():
        if i in matched:
            continue
        rows.append(
            {
                **_empty_run_fields(),
                **_reported_fields(rep),
                "section": SECTIONS[rep["task"]],
                "task": rep["task"],
                "dataset": rep["dataset"],
                "method": rep["method"],
                "model": rep["model"],
                "w_bits": int(rep["w_bits"]),
                "a_bits": int(rep["a_bits"]),
                "aw": aw_notation(rep["a_bits"], rep["w_bits"], rep["notation"]),
                "metric": rep["metric"],
                "metric_label": METRICS[rep["metric"]][1],
                "reproduced": math.nan,
                "std": math.nan,
                "n": 0,
                "fp_reproduced": math.nan,
                "method_comment": comments.get(rep["method"], ""),
            }
        )

    paper_fp = _reported_baselines(reported)

    for row in rows:
        rep, rp = row["reported"], row["reproduced"]
        row["delta"] = rp - rep if math.isfinite(rep) and math.isfinite(rp) else math.nan
        row["drop"] = rp - row["fp_reproduced"] if row["method"] != "fp32" else math.nan
        row["reported_fp"] = paper_fp.get((row["paper"], row["dataset"], row["model"], row["metric"]), math.nan)
        row["reported_drop"] = rep - row["reported_fp"] if row["method"] != "fp32" else math.nan
        other_data = bool(row["data_variant"]) and math.isfinite(rep)
        row["data_note"] = f"ours: {row['data_variant']}; paper: original images" if other_data else ""
        row["delta_basis"] = "absolute"
        if other_data and math.isfinite(rp):
            # different images: absolute numbers do not compare; the drops from each side's
            # own full-precision baseline do, where both sides have one
            if math.isfinite(row["drop"]) and math.isfinite(row["reported_drop"]):
                row["delta_basis"] = "drop"
                row["badge"] = _badge(row["drop"] - row["reported_drop"], row["tolerance"])
            else:
                row["delta_basis"] = "none"
                row["badge"] = "other-data"
        elif math.isfinite(row["delta"]):
            row["badge"] = _badge(row["delta"], row["tolerance"])
        elif not math.isfinite(rep):
            row["badge"] = "failed" if row["status"] == "failed" else "no-reported"
        else:
            row["badge"] = "failed" if row["status"] == "failed" else "not-run"
        row["comment"] = _join_comment(row["reported_comment"], row["suite_comment"], row["method_comment"])
        row["size_flag"] = size_flag(row["size_mb"], row["reported_size_mb"])

    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    order = {s: i for i, s in enumerate(SECTIONS.values())}
    df = df.assign(
        _s=df["section"].map(order),
        _fp=(df["method"] != "fp32").astype(int),
        _w=-df["w_bits"].fillna(0).astype(float),
        _a=-df["a_bits"].fillna(0).astype(float),
        _r=df["n"].eq(0).astype(int),
    ).sort_values(
        ["_s", "dataset", "model", "_fp", "method", "_w", "_a", "_r", "model_options", "suite", "paper", "variant"],
        kind="stable",
    )
    df = df.drop(columns=["_s", "_fp", "_w", "_a", "_r"]).reset_index(drop=True)
    df["n"] = df["n"].astype(int)
    df["n_failed"] = df["n_failed"].astype(int)
    return df


def leaderboard_table(
    tracking_uri: str,
    reported: pd.DataFrame | None = None,
    runs: list[Run] | None = None,
    bundle: Path | str | None = DEFAULT,
) -> pd.DataFrame:
    """The leaderboard of ``tracking_uri``'s runs (and the results ``bundle``'s, where the
    store does not hold the cell; None: none) joined with every reported number."""
    if runs is None:
        runs = merge(fetch_runs(tracking_uri, details=False), load_bundle(bundle))
    reported = load_reported() if reported is None else reported
    return build_table(runs, reported)
