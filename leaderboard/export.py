"""Exports of the leaderboard table: Markdown (EasyQuantization's README table plus a
Reproduced column, ready to paste), CSV and JSON (every column of the table).

CSV cells are opened by spreadsheets, which run a cell that starts with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return as a formula (``=HYPERLINK(...)`` in a comment). Text cells
that start so get a leading single quote (OWASP's advice against CSV injection); numbers,
negative ones included, stay numbers."""

from __future__ import annotations

import json
import math
import re

import pandas as pd

from .table import SECTIONS

MD_COLUMNS = [
    "Dataset",
    "Method",
    "Model",
    "A/W",
    "Reported",
    "Reproduced {metric}",
    "Δ",
    "Comment",
]


#: an HTML character reference (``&gt;``, ``&#62;``): Markdown would render it as the character
_ENTITY = re.compile(r"&(?=#?\w+;)")


def _md_cell(v: object) -> str:
    """Table-safe Markdown that reads as the text it is (``epochs > 0``, not ``epochs &gt; 0``):
    no pipes, no line breaks, and no raw HTML: a ``<`` and the ``&`` of a character reference
    are backslash-escaped (CommonMark renders ``\\<script>`` as the text ``<script>``)."""
    s = " ".join(str(v).split())
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")
    return _ENTITY.sub("\\\\&", s) or "-"


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def reproduced_text(row: pd.Series) -> str:
    if not _finite(row["reproduced"]):
        return "failed" if row["status"] == "failed" else "-"
    s = f"{row['reproduced']:.2f}"
    if _finite(row["std"]):
        s += f" ± {row['std']:.2f}"
    return s + f" (n={int(row['n'])})"


def to_markdown(table: pd.DataFrame) -> str:
    """One Markdown table per section, in EasyQuantization's shape (Dataset | Method | Model |
    A/W | Reported | ... | Comment) with the reproduced number and its delta."""
    out: list[str] = []
    for section in SECTIONS.values():
        rows = table[table["section"] == section]
        if rows.empty:
            continue
        label = rows["metric_label"].iloc[0]
        header = [c.format(metric=label) for c in MD_COLUMNS]
        out += [
            f"### {section}",
            "",
            " | ".join(header),
            "|".join(["--- "] + [":---:"] * (len(header) - 1)),
        ]
        for _, r in rows.iterrows():
            delta = f"{r['delta']:+.2f} ({r['badge']})" if _finite(r["delta"]) else "-"
            if r["delta_basis"] == "drop":  # other images than the paper's: the drops compare
                delta = f"drop {r['drop']:+.2f} vs paper {r['reported_drop']:+.2f} ({r['badge']}; {r['data_note']})"
            elif r["delta_basis"] == "none":
                delta = f"{r['delta']:+.2f} absolute, not comparable ({r['data_note']})"
            reported = f"{r['reported']:.2f}" if _finite(r["reported"]) else "-"
            cells = [
                r["dataset"],
                r["method"],
                f"{r['model']} ({r['model_options']})" if r["model_options"] else r["model"],
                r["aw"],
                reported,
                reproduced_text(r),
                delta,
                r["comment"],
            ]
            out.append(" | ".join(_md_cell(c) for c in cells))
        out.append("")
    if not out:
        return "No runs and no reported numbers.\n"
    return "\n".join(out)


def _flat(table: pd.DataFrame) -> pd.DataFrame:
    df = table.copy()
    for col, sep in (("run_ids", " "), ("seeds", " "), ("errors", " | ")):
        df[col] = df[col].map(lambda v, sep=sep: sep.join(map(str, v)))
    return df


#: what a spreadsheet takes as the start of a formula (OWASP, CSV injection)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(v: object) -> object:
    """A text cell a spreadsheet would run as a formula, quoted to stay text; anything else as is."""
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        return "'" + v
    return v


def to_csv(table: pd.DataFrame) -> str:
    df = _flat(table)
    for col in df.columns:
        if not pd.api.types.is_numeric_dtype(df[col]):
            df[col] = df[col].map(_csv_text)
    return df.to_csv(index=False)


def to_json(table: pd.DataFrame) -> str:
    records = []
    for rec in table.to_dict("records"):
        records.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()})
    return json.dumps(records, indent=2, default=str) + "\n"
