"""qbench.leaderboard: MLflow runs + the papers' reported numbers -> one pandas table ->
a static site (``<out>/site/``) and Markdown/CSV/JSON exports.

``build_site(tracking_uri, out_dir)`` is what ``qbench run`` calls at the end;
``qbench leaderboard`` is the command line.
"""

from __future__ import annotations

from .reported import load_reported
from .site import build_site
from .table import build_table, leaderboard_table

__all__ = ["build_site", "build_table", "leaderboard_table", "load_reported"]
