"""Stores that cannot be written or reached end within seconds with one line and exit 2,
recording nothing: an output folder that cannot be created or written, a tracking server
that refuses connections, and one that accepts them and never answers."""

from __future__ import annotations

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


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the check needs another user")
def test_a_read_only_output_folder(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        res, _ = qbench("run", str(SUITE), "--out", str(out))
        assert "cannot write to the output folder" in one_error_line(res)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


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
