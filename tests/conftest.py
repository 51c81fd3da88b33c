"""Shared fixtures. Tests that need ../shared/data skip with a clear reason without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The leaderboard merges the repository's results bundle (results/) by default; tests see
# only the runs they made (and their subprocesses inherit this), unless a test names a bundle.
os.environ["QBENCH_BUNDLE"] = ""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test data beside the checkout (../shared/data), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only CI and developers have it)")
    return SHARED_DATA


@pytest.fixture
def repo() -> Path:
    return REPO


def run_suite(suite: Path, out: Path, timeout: float = 600) -> None:
    """``qbench run SUITE --out OUT --no-leaderboard`` in a subprocess, as a user types it;
    the test fails with the command's output if it does not exit 0."""
    res = subprocess.run(
        [sys.executable, "-m", "qbench.harness.cli", "run", str(suite), "--out", str(out), "--no-leaderboard"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def sigint_as_a_terminal_sends_it() -> None:
    """``preexec_fn`` for a child a test sends SIGINT: its SIGINT at the default, as a shell
    in a terminal starts it. A test session started in the background by a script (``cmd &``
    without job control) ignores SIGINT, every child inherits that, and Python then installs
    no KeyboardInterrupt handler: the Ctrl-C tests would test nothing but the launch."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
