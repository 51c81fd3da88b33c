"""Models: one file per family, each variant a small function under ``@register_model``;
:func:`create_model` is the single way in (the timm pattern).

A model factory is called as ``fn(num_classes=..., in_channels=..., image_size=..., **options)``
and returns an ``nn.Module`` in full precision. Quantization methods never live here:
they are applied afterwards by :mod:`qbench.methods`.

Every model names its first and last layers for the methods' first/last-layer policy
through :func:`qbench.methods.layers.first_last_layers` (by default: the first Conv2d/Linear and the last Linear
in module order).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from qbench.methods.layers import first_last_layers
from qbench.methods.registry import Registry
from torch import nn

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

_MODULES = ["small_cnn", "cifar_resnet", "lenet", "vgg", "resnet", "mobilenet", "preact_resnet", "bireal"]


def register_model(name: str):
    return MODELS.register(name)


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")


MODELS._load = _load_all  # type: ignore[method-assign]


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    where: str | None = None,
    **options,
) -> nn.Module:
    """Build the full-precision model ``name`` for a dataset's shape."""
    return MODELS.get(name, where)(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)


__all__ = ["MODELS", "create_model", "first_last_layers", "register_model"]
