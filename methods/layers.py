"""Layer selection: which layers of a model a method's first/last-layer policy applies to."""

from __future__ import annotations

from torch import nn


def first_last_layers(model: nn.Module) -> tuple[str, str]:
    """Names of the first and last weight layers (a model may override with
    ``qbench_first_last = (first_name, last_name)``): by default the first Conv2d/Linear
    and the last one in module order."""
    override = getattr(model, "qbench_first_last", None)
    if override:
        return tuple(override)  # type: ignore[return-value]
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return names[0], names[-1]


def quantizable(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` lies in the part of ``model`` a method may quantize. A model
    may restrict it with ``qbench_quantize_only`` (dotted-name prefixes, e.g. a detector's
    ``("backbone.body",)`` for the dashboard's "Quantize-Backbone"): every layer outside
    stays in full precision. Without it, the whole model."""
    only = getattr(model, "qbench_quantize_only", None)
    if not only:
        return True
    return any(name == p or name.startswith(p + ".") for p in only)
