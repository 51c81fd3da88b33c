"""Datasets: a registry with one way in, :func:`load_dataset`.

A dataset factory takes ``root`` (a folder, or None for embedded data) plus keyword
options and returns a :class:`DataBundle`. Small datasets are held as uint8 tensors
(:class:`TensorSplit`) that move to the device once and are augmented there per batch;
large ones are torch Datasets served by a DataLoader.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import NamedTuple

from qbench.methods.registry import Registry

from .base import DataBundle, TensorSplit

DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")

# Modules that register datasets when imported (one file per family).
_MODULES = ["digits", "mnist", "cifar", "imagenet"]


class DatasetShape(NamedTuple):
    """What a model is built for, known without loading the data."""

    num_classes: int
    in_channels: int
    image_size: int


#: the nominal shape of each registered dataset that declares one (see :func:`dataset_shape`)
SHAPES: dict[str, DatasetShape] = {}


def register_dataset(name: str, shape: tuple[int, int, int] | None = None):
    """Register ``fn(root: str | None, **options) -> DataBundle`` under ``name``.

    ``shape`` is ``(num_classes, in_channels, image_size)`` as the data will have it, so a
    suite's models can be checked (built on the meta device) before any data is loaded."""

    def deco(fn):
        DATASETS.register(name)(fn)
        if shape is not None:
            SHAPES[name] = DatasetShape(*shape)
        return fn

    return deco


def dataset_shape(name: str, options: dict | None = None) -> DatasetShape | None:
    """The shape ``name`` declared at registration (None if it declared none), with an
    ``image_size`` option, where the dataset takes one, in place of the declared size."""
    shape = SHAPES.get(name) if name in DATASETS else None
    size = (options or {}).get("image_size")
    if shape is None or not isinstance(size, int) or isinstance(size, bool):
        return shape
    try:
        takes_size = "image_size" in inspect.signature(DATASETS.get(name)).parameters
    except (TypeError, ValueError):  # no signature to read
        takes_size = False
    return shape._replace(image_size=size) if takes_size else shape


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")


DATASETS._load = _load_all  # type: ignore[method-assign]


def load_dataset(name: str, root: str | None = None, where: str | None = None, **options) -> DataBundle:
    """Build the dataset ``name``; ``root`` is the data folder (``--data-root``)."""
    return DATASETS.get(name, where)(root, **options)


__all__ = [
    "DATASETS",
    "SHAPES",
    "DataBundle",
    "DatasetShape",
    "TensorSplit",
    "dataset_shape",
    "load_dataset",
    "register_dataset",
]
