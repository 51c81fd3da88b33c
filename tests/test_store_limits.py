"""Stores that cannot be written or reached end within seconds with one line and exit 2,
recording nothing: an output folder that cannot be created or written, a tracking server
that refuses connections, and one that accepts them and never answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUITE = Path(__file__).parent / "suites" / "tiny.yaml"


def qbench(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "qbench.harness.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    return res, time.monotonic() - t0


def one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("qbench: error:"), res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    return lines[0]


def test_an_output_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res, _ = qbench("run", str(SUITE), "--out", str(blocker / "out"))
    line = one_error_line(res)
    assert "cannot write to the output folder" in line and str(blocker / "out") in line


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made read-only: a read-only bind mount as root (who writes through file
    modes), else its mode; skips where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mount = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("root without mount privileges: cannot make a read-only folder")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_read_only_output_folder(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    with read_only(out):
        res, took = qbench("run", str(SUITE), "--out", str(out))
        assert "cannot write to the output folder" in one_error_line(res)
        assert took < 30
        assert list(out.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_is_down(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    res, took = qbench("run", str(SUITE), "--out", str(tmp_path / "out"), "--tracking-uri", uri)
    line = one_error_line(res)
    assert "unreachable" in line and uri in line
    assert took < 30
    assert not (tmp_path / "out").exists()


def test_a_tracking_server_that_never_answers(tmp_path):
    with socket.socket() as server:  # accepts connections (backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        for args in (("run", str(SUITE)), ("show", str(SUITE))):
            res, took = qbench(*args, "--out", str(tmp_path / "out"), "--tracking-uri", uri)
            line = one_error_line(res)
            assert "no answer within" in line and uri in line
            assert took < 30
    assert not (tmp_path / "out").exists()


def _file_size_limit(nbytes: int):
    """A file-size limit for the child (as a full disk: writes past it fail with EFBIG)."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def test_a_full_disk_stops_the_suite_with_one_line(tmp_path):
    out = tmp_path / "out"
    res, _ = qbench("run", str(SUITE), "--out", str(out), "--no-leaderboard")
    assert res.returncode == 0, res.stderr
    db = out / "mlflow.db"
    limit = db.stat().st_size  # the store cannot grow by a single page
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "qbench.harness.cli", "run", str(SUITE.parent / "long.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_file_size_limit(limit),
    )
    line = one_error_line(res)
    assert "no space left" in line and str(out) in line
    assert time.monotonic() - t0 < 60
    assert not list(out.rglob("*.tmp")), "no partial files left behind"
    from qbench.harness.tracking import Tracker, default_uri

    runs = Tracker(default_uri(out)).runs()
    assert len(runs) == 3 and {r.status for r in runs.values()} == {"done"}, "the finished cells are kept"
