"""What the leaderboard shows about every registered method (``qbench.methods.METHODS``).

A plugin whose entry point fails to import is listed with the error instead of taking the
whole leaderboard down.
"""

from __future__ import annotations

from typing import Any


def _describe(name: str, cls: Any) -> dict:
    paper = getattr(cls, "paper", None)
    year = getattr(paper, "year", 0) or 0
    return {
        "name": name,
        "title": getattr(paper, "title", "") if paper else "",
        "authors": getattr(paper, "authors", "") if paper else "",
        "venue": getattr(paper, "venue", "") if paper else "",
        "year": year,
        "cite": paper.cite() if paper is not None and year else "",
        "url": getattr(paper, "url", "") if paper else "",
        "code": getattr(paper, "code", "") if paper else "",
        "comment": str(getattr(cls, "comment", "") or ""),
        "status": str(getattr(cls, "status", "") or ""),
        "init": str(getattr(cls, "init", "") or ""),
        "weight_bits": _bits_range(getattr(cls, "weight_bits", ())),
        "act_bits": _bits_range(getattr(cls, "act_bits", ())),
        "error": "",
    }


def _bits_range(bits) -> str:
    """(2, 3, 4, 5, 8, 32) -> '2..5, 8, 32'."""
    runs: list[list[int]] = []
    for b in sorted({int(b) for b in bits}):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def registered_methods() -> list[dict]:
    """One dict per registered method, sorted by name; a plugin that fails to import is
    listed with its error (and warned about once on stderr by the registry)."""
    from qbench.methods import METHODS

    out = [_describe(name, cls) for name, cls in METHODS.items()]
    out += [{**_describe(name, None), "error": err} for name, err in METHODS.errors.items()]
    return sorted(out, key=lambda m: m["name"])
