"""Decode once: small datasets are stored as one uint8 tensor file per split.

Decoding 60,000 JPEG files or unpickling CIFAR batches takes seconds; loading a
tensor file takes milliseconds. The cache key holds the dataset, its variant, the
split and a fingerprint of the source files (absolute path, size, modification time),
so a changed or replaced source is decoded again.

Where: the ``cache_dir`` dataset option, else ``$QBENCH_CACHE``, else
``$XDG_CACHE_HOME/qbench`` (``~/.cache/qbench``). The data folder itself is never
written to (it is often read-only or shared). Files are written atomically, so a
killed run leaves no half-written cache behind; an unreadable cache file is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

FORMAT = 1  # bump when the stored layout changes


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("QBENCH_CACHE"):
        return Path(os.environ["QBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qbench"


def _files(paths: Iterable[Path]) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p).resolve()
        if p.is_dir():  # a folder source: every file in it counts
            out.extend(Path(r) / f for r, _, fs in os.walk(p) for f in fs)
        else:
            out.append(p)
    return sorted(out)


def fingerprint(paths: Iterable[Path]) -> str:
    """A short hash of the source files' paths, sizes and modification times."""
    h = hashlib.sha1(f"v{FORMAT}".encode())
    for p in _files(paths):
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached_tensors(
    key: str,
    sources: Iterable[Path],
    build: Callable[[], dict],
    cache_dir: str | os.PathLike | None = None,
    enabled: bool = True,
) -> dict:
    """``build()`` (a dict of tensors and plain values), or its cached copy.

    ``key`` names the entry (``cifar10-jpeg-train``); ``sources`` are the files it was
    decoded from.
    """
    if not enabled:
        return build()
    path = cache_root(cache_dir) / f"{key}-{fingerprint(sources)}.pt"
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # truncated or from another version: decode again
            path.unlink(missing_ok=True)
    data = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache is not an error: the data is still returned
    return data


def default_data_root() -> Path:
    """Where datasets are looked for and downloaded when no ``--data-root`` is given:
    ``$QBENCH_DATA``, else ``<cache root>/data``."""
    if os.environ.get("QBENCH_DATA"):
        return Path(os.environ["QBENCH_DATA"]).expanduser()
    return cache_root() / "data"
