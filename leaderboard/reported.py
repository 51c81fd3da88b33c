"""The numbers the papers reported, read from ``methods/reported/<paper>.yaml``.

One file per paper (the only place a reported number is typed)::

    paper: {key: apot, title: "...", authors: "...", venue: ICLR, year: 2020, url: "..."}
    rows:
      - {dataset: cifar10, model: resnet20, method: apot, w_bits: 4, a_bits: 4,
         metric: top1, value: 92.45, source: "APoT README, CIFAR10 table", comment: ""}

Required row keys: ``dataset``, ``model``, ``method``, ``w_bits``, ``a_bits`` (integers
1..32), ``metric`` (one of :data:`METRICS`), ``value`` (a number), ``source`` (where in the
paper or README the number is printed). Optional: ``comment``; ``notation`` (how the
leaderboard writes A/W when the bits alone do not say it, e.g. ``ter/ter``); ``task``
(classification | detection | segmentation, else inferred from the metric); ``variant``
(tells apart two rows of one configuration, e.g. a regularizer strength); ``size_mb``,
``compression_ratio``, ``rel_bops`` (relative BOPs in %), the paper's own size figures.

Every malformed file raises :class:`~qbench.harness.errors.QbenchError` naming the file and
the row (``methods/reported/apot.yaml: rows[3].w_bits``).

Plugins ship their papers' numbers the same way. A distribution names a package through
the entry-point group ``qbench.reported``::

    [project.entry-points."qbench.reported"]
    twn = "qbench_twn.reported"        # a package holding twn.yaml (as package data)

and every ``*.yaml`` of that package is read after qbench's own files, named
``<distribution name>:<file name>`` in errors (``qbench-twn:twn.yaml: rows[0].value``). A
plugin whose package fails to import (or is not a package) costs only itself: one warning
line on stderr, once per process (``qbench: warning: reported numbers of plugin 'twn' from
qbench-twn 0.1.0 (qbench_twn.reported) failed to load: ...; skipped``), and the other files
still load. A malformed file is an error like any other, and a paper key may be used once
across qbench's files and every plugin's.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterable
from importlib import resources
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pandas as pd
import yaml
from qbench.harness.errors import QbenchError

PACKAGE = "qbench.methods.reported"
#: the entry-point group through which plugins name their packages of reported numbers
GROUP = "qbench.reported"

#: metric name -> (task it belongs to, label in tables)
METRICS: dict[str, tuple[str, str]] = {
    "top1": ("classification", "Top-1"),
    "top5": ("classification", "Top-5"),
    "box_ap": ("detection", "AP"),
    "mask_ap": ("segmentation", "seg AP"),
}
TASKS = ("classification", "detection", "segmentation")

PAPER_REQUIRED = ("key", "title", "authors", "venue", "year")
PAPER_OPTIONAL = ("url", "code")
ROW_REQUIRED = ("dataset", "model", "method", "w_bits", "a_bits", "metric", "value", "source")
ROW_OPTIONAL = (
    "comment",
    "notation",
    "task",
    "variant",
    "size_mb",
    "compression_ratio",
    "rel_bops",
)

#: the columns of :func:`load_reported`'s DataFrame, in order
COLUMNS = [
    "paper",
    "paper_title",
    "paper_cite",
    "paper_url",
    "file",
    "row",
    "dataset",
    "model",
    "method",
    "w_bits",
    "a_bits",
    "notation",
    "task",
    "metric",
    "value",
    "source",
    "comment",
    "variant",
    "size_mb",
    "compression_ratio",
    "rel_bops",
]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise QbenchError(f"expected a non-empty name (a qbench registry name), got {v!r}", where)
    return v.strip()


def _bits(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32:
        raise QbenchError(
            f"expected an integer bit-width 1..32, got {v!r} (write ternary or mixed precision "
            "as bits plus a `notation:` field such as ter/ter)",
            where,
        )
    return v


def _text(v: Any, where: str, optional: bool = True) -> str:
    if v is None and optional:
        return ""
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise QbenchError(f"expected text, got {v!r}", where)
    return str(v)


def _optional_number(v: Any, where: str) -> float:
    if v is None:
        return math.nan
    if not _is_number(v) or float(v) < 0:
        raise QbenchError(f"expected a non-negative number, got {v!r}", where)
    return float(v)


def parse_reported(text: str, file: str) -> list[dict]:
    """Validate one reported-numbers file's text; return its rows as flat dicts."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise QbenchError(f"not valid YAML{at}: {getattr(e, 'problem', e)}", file) from None
    if not isinstance(doc, dict):
        raise QbenchError("expected a mapping with keys `paper` and `rows`", file)
    unknown = set(doc) - {"paper", "rows"}
    if unknown:
        raise QbenchError(f"unknown key(s) {sorted(unknown)}; expected `paper` and `rows`", file)
    paper = doc.get("paper")
    if not isinstance(paper, dict):
        raise QbenchError("expected a mapping (key, title, authors, venue, year, url)", f"{file}: paper")
    for k in PAPER_REQUIRED:
        if paper.get(k) in (None, ""):
            raise QbenchError(f"missing required key `{k}`", f"{file}: paper")
    extra = set(paper) - set(PAPER_REQUIRED) - set(PAPER_OPTIONAL)
    if extra:
        raise QbenchError(
            f"unknown key(s) {sorted(extra)}; allowed: {', '.join(PAPER_REQUIRED + PAPER_OPTIONAL)}",
            f"{file}: paper",
        )
    year = paper["year"]
    if isinstance(year, bool) or not isinstance(year, int):
        raise QbenchError(f"expected an integer year, got {year!r}", f"{file}: paper.year")
    key = _name(paper["key"], f"{file}: paper.key")
    cite = f"{paper['authors']}, {paper['title']}, {paper['venue']} {year}"
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        raise QbenchError("expected a non-empty list of rows", f"{file}: rows")

    out = []
    seen: dict[tuple, int] = {}
    for i, row in enumerate(rows):
        where = f"{file}: rows[{i}]"
        if not isinstance(row, dict):
            raise QbenchError(f"expected a mapping, got {row!r}", where)
        missing = [k for k in ROW_REQUIRED if k not in row]
        if missing:
            raise QbenchError(f"missing required key(s) {missing}", where)
        extra = set(row) - set(ROW_REQUIRED) - set(ROW_OPTIONAL)
        if extra:
            raise QbenchError(
                f"unknown key(s) {sorted(extra)}; allowed: {', '.join(ROW_REQUIRED + ROW_OPTIONAL)}",
                where,
            )
        metric = row["metric"]
        if metric not in METRICS:
            raise QbenchError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}", f"{where}.metric")
        value = row["value"]
        if not _is_number(value):
            raise QbenchError(f"expected a number, got {value!r}", f"{where}.value")
        if metric in ("top1", "top5") and not 0 <= float(value) <= 100:
            raise QbenchError(f"accuracy in percent expected (0..100), got {value!r}", f"{where}.value")
        task = row.get("task") or METRICS[metric][0]
        if task not in TASKS:
            raise QbenchError(f"unknown task {task!r}; known: {', '.join(TASKS)}", f"{where}.task")
        source = _text(row["source"], f"{where}.source", optional=False)
        if not source.strip():
            raise QbenchError("every reported number needs its source (paper table or README)", f"{where}.source")
        rec = {
            "paper": key,
            "paper_title": str(paper["title"]),
            "paper_cite": cite,
            "paper_url": str(paper.get("url") or ""),
            "file": file,
            "row": i,
            "dataset": _name(row["dataset"], f"{where}.dataset"),
            "model": _name(row["model"], f"{where}.model"),
            "method": _name(row["method"], f"{where}.method"),
            "w_bits": _bits(row["w_bits"], f"{where}.w_bits"),
            "a_bits": _bits(row["a_bits"], f"{where}.a_bits"),
            "notation": _text(row.get("notation"), f"{where}.notation"),
            "task": task,
            "metric": metric,
            "value": float(value),
            "source": source,
            "comment": _text(row.get("comment"), f"{where}.comment"),
            "variant": _text(row.get("variant"), f"{where}.variant"),
            "size_mb": _optional_number(row.get("size_mb"), f"{where}.size_mb"),
            "compression_ratio": _optional_number(row.get("compression_ratio"), f"{where}.compression_ratio"),
            "rel_bops": _optional_number(row.get("rel_bops"), f"{where}.rel_bops"),
        }
        ident = tuple(
            rec[k]
            for k in (
                "dataset",
                "model",
                "method",
                "w_bits",
                "a_bits",
                "notation",
                "metric",
                "variant",
                "comment",
            )
        )
        if ident in seen:
            raise QbenchError(
                f"duplicate of rows[{seen[ident]}] "
                "(same dataset/model/method/bits/metric/variant/comment); "
                "tell them apart with `variant:`",
                where,
            )
        seen[ident] = i
        out.append(rec)
    return out


def _yaml_files(root) -> list[tuple[str, str]]:
    """(file name, text) of every ``*.yaml``/``*.yml`` directly in a package folder, by name."""
    return [
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.name.endswith((".yaml", ".yml")) and entry.is_file()
    ]


def _dist_name(ep: EntryPoint) -> str:
    d = getattr(ep, "dist", None)
    return str(d.metadata["Name"]) if d is not None else "unknown-distribution"


def _dist_label(ep: EntryPoint) -> str:
    d = getattr(ep, "dist", None)
    return f"{d.metadata['Name']} {d.version}" if d is not None else "an unknown distribution"


#: plugins already warned about in this process (entry-point name and value)
_warned: set[tuple[str, str]] = set()


def _warn_plugin(ep: EntryPoint, message: str) -> None:
    key = (ep.name, ep.value)
    if key in _warned:
        return
    _warned.add(key)
    msg = " ".join(message.split())[:300]
    print(
        f"qbench: warning: reported numbers of plugin {ep.name!r} from {_dist_label(ep)} ({ep.value}) "
        f"failed to load: {msg}; skipped",
        file=sys.stderr,
    )


def _plugin_entry_points() -> list[EntryPoint]:
    """The ``qbench.reported`` entry points, by name; one distribution seen twice on
    ``sys.path`` counts once."""
    found: list[EntryPoint] = []
    for ep in entry_points(group=GROUP):
        if not any(e.name == ep.name and e.value == ep.value and _dist_label(e) == _dist_label(ep) for e in found):
            found.append(ep)
    return sorted(found, key=lambda e: (e.name, _dist_name(e)))


def _plugin_files() -> Iterable[tuple[str, str]]:
    """The ``*.yaml`` files of every package named in the ``qbench.reported`` group, each
    named ``<distribution>:<file>``; a package that fails to import is skipped with a
    warning."""
    for ep in _plugin_entry_points():
        try:
            module = importlib.import_module(ep.module)
            if not hasattr(module, "__path__"):
                raise TypeError(f"{ep.module!r} is a module, not a package of *.yaml files")
            files = _yaml_files(resources.files(module))
        except Exception as e:
            _warn_plugin(ep, f"{type(e).__name__}: {e}")
            continue
        for name, text in files:
            yield f"{_dist_name(ep)}:{name}", text


def _package_files() -> Iterable[tuple[str, str]]:
    """qbench's own files (``methods/reported/<file>``), then every plugin's."""
    for name, text in _yaml_files(resources.files(PACKAGE)):
        yield f"methods/reported/{name}", text
    yield from _plugin_files()


def load_reported(files: Iterable[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Every reported number as one DataFrame (columns :data:`COLUMNS`).

    ``files`` is an iterable of ``(name, text)``; by default every ``*.yaml`` of the
    ``qbench.methods.reported`` package and of each plugin package named in the
    ``qbench.reported`` entry-point group. Two files may not share a paper key.
    """
    rows: list[dict] = []
    keys: dict[str, str] = {}
    for name, text in _package_files() if files is None else files:
        parsed = parse_reported(text, name)
        key = parsed[0]["paper"]
        if key in keys:
            raise QbenchError(f"paper key {key!r} is already used by {keys[key]}", f"{name}: paper.key")
        keys[key] = name
        rows.extend(parsed)
    return pd.DataFrame(rows, columns=COLUMNS)
