"""``qbench server``: the ``mlflow server`` it starts, the URI it prints, and one-line errors.
(test_dask.py starts a real one and runs a suite through it.)"""

from __future__ import annotations

import socket
import sys

import pytest
from click.testing import CliRunner
from qbench.harness.cli import cli


@pytest.fixture
def execv(monkeypatch):
    """Capture the command ``qbench server`` would replace itself with."""
    seen: list[list[str]] = []
    monkeypatch.setattr("os.execv", lambda path, argv: seen.append(list(argv)))
    return seen


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_server_runs_mlflow_with_proxied_artifacts_and_prints_the_uri(tmp_path, monkeypatch, execv):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(
        cli, ["server", "--port", str(port), "--backend-store-uri", "sqlite:///store/mlflow.db"]
        + ["--artifacts-destination", "art"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"use --tracking-uri http://{socket.gethostname()}:{port}" in res.output
    (argv,) = execv
    assert argv[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert option(argv, "--host") == "0.0.0.0" and option(argv, "--port") == str(port)
    assert option(argv, "--backend-store-uri") == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "made absolute"
    assert "--serve-artifacts" in argv and option(argv, "--artifacts-destination") == str(tmp_path / "art")
    assert (tmp_path / "store").is_dir() and (tmp_path / "art").is_dir()
    if "--allowed-hosts" in argv:  # MLflow 3 checks the Host header: the printed name must pass
        assert socket.gethostname() in option(argv, "--allowed-hosts").split(",")


def test_a_plain_path_is_an_sqlite_store_and_localhost_prints_localhost(tmp_path, execv):
    res = CliRunner().invoke(
        cli, ["server", "--host", "127.0.0.1", "--port", "0", "--backend-store-uri", str(tmp_path / "x.db")]
        + ["--artifacts-destination", str(tmp_path / "a")],
    )  # fmt: skip
    assert res.exit_code == 2 and "0 is not in the range" in res.output  # click's own check
    res = CliRunner().invoke(
        cli, ["server", "--host", "127.0.0.1", "--port", "5999", "--backend-store-uri", str(tmp_path / "x.db")]
        + ["--artifacts-destination", str(tmp_path / "a")],
    )  # fmt: skip
    if res.exit_code == 2 and "cannot listen" in res.output:
        pytest.skip("port 5999 is taken on this machine")
    assert res.exit_code == 0, res.output
    assert "use --tracking-uri http://127.0.0.1:5999" in res.output
    assert option(execv[0], "--backend-store-uri") == f"sqlite:///{tmp_path / 'x.db'}"


def test_a_port_in_use_is_one_line_and_starts_nothing(tmp_path, execv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        store = f"sqlite:///{tmp_path / 'db' / 'm.db'}"
        res = CliRunner().invoke(
            cli, ["server", "--host", "127.0.0.1", "--port", str(port)]
            + ["--backend-store-uri", store, "--artifacts-destination", str(tmp_path)],
        )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert res.output.startswith("qbench: error: --port: cannot listen on 127.0.0.1:")
    assert "another --port" in res.output
    assert len(res.output.strip().splitlines()) == 1 and execv == []
