"""``qbench server``: the ``mlflow server`` command line that lets many machines write one
store (runs in ``--backend-store-uri``, artifacts proxied into ``--artifacts-destination``,
so workers need no shared artifact folder), checked before it starts."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from .errors import QbenchError


def _store_uri(uri: str) -> str:
    """An SQLAlchemy URI; a plain path is an SQLite file. A relative SQLite path is made
    absolute (the server may be started from elsewhere next time) and its folder created."""
    if "://" not in uri:
        uri = f"sqlite:///{Path(uri).resolve()}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
        if str(path) != ":memory:":
            path = path.resolve()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise QbenchError(
                    f"cannot create the store's folder ({e.strerror or e})", "--backend-store-uri"
                ) from None
            uri = f"sqlite:///{path}"
    return uri


def _artifacts(dest: str) -> str:
    if "://" in dest:
        return dest
    path = Path(dest).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QbenchError(f"cannot create the artifact folder ({e.strerror or e})", "--artifacts-destination") from None
    return str(path)


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise QbenchError(
                f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port", "--port"
            ) from None


def _allowed_hosts(host: str, given: str | None) -> list[str]:
    """``--allowed-hosts`` for MLflow versions that check the Host header (MLflow 3): its
    default (localhost, private IPs) plus this machine's names, so that workers may use the
    URI printed here."""
    try:
        from mlflow.server.security_utils import get_default_allowed_hosts
    except ImportError:  # an MLflow without host checks (and without the option)
        return ["--allowed-hosts", given] if given else []
    if given:
        return ["--allowed-hosts", given]
    names = {socket.gethostname(), socket.getfqdn()}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host)
    extra = [p for n in sorted(names) if n for p in (n, f"{n}:*")]
    return ["--allowed-hosts", ",".join(get_default_allowed_hosts() + extra)]


def server_command(
    host: str, port: int, backend_store_uri: str, artifacts_destination: str, workers: int, allowed_hosts: str | None
) -> tuple[list[str], str]:
    """The ``mlflow server`` argv to run, and the tracking URI clients should use."""
    store = _store_uri(backend_store_uri)
    dest = _artifacts(artifacts_destination)
    _check_port(host, port)
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        store,
        "--serve-artifacts",
        "--artifacts-destination",
        dest,
        "--workers",
        str(workers),
        *_allowed_hosts(host, allowed_hosts),
    ]
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return argv, f"http://{shown}:{port}"
