"""Datasets: a registry with one way in, :func:`load_dataset`.

A dataset factory takes ``root`` (a folder, or None for embedded data) plus keyword
options and returns a :class:`DataBundle`. Small datasets are held as uint8 tensors
(:class:`TensorSplit`) that move to the device once and are augmented there per batch;
large ones are torch Datasets served by a DataLoader.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from qbench.methods.registry import Registry

from .base import DataBundle, TensorSplit

DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")

# Modules that register datasets when imported (one file per family).
_MODULES = ["digits", "mnist", "cifar", "imagenet"]


def register_dataset(name: str):
    """Register ``fn(root: str | None, **options) -> DataBundle`` under ``name``."""
    return DATASETS.register(name)


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")


DATASETS._load = _load_all  # type: ignore[method-assign]


def load_dataset(name: str, root: str | None = None, where: str | None = None, **options) -> DataBundle:
    """Build the dataset ``name``; ``root`` is the data folder (``--data-root``)."""
    return DATASETS.get(name, where)(root, **options)


__all__ = ["DATASETS", "DataBundle", "TensorSplit", "load_dataset", "register_dataset"]
