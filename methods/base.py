"""The method plugin contract.

A method is a :class:`Method` subclass registered under a name, in this package or in
any installed distribution through the entry-point group ``qbench.methods``
(``[project.entry-points."qbench.methods"] mymethod = "mypkg.mod:MyMethod"``). The
core never imports a method by name: qbench's own methods are registered through the
same entry points as a third party's.

Life of a cell, as the runner drives it::

    method = MethodCls(w_bits, a_bits, **options)       # options validated by ``Options``
    model = method.prepare(model, ctx)                   # swap/wrap layers
    method.calibrate(model, ctx)                         # optional, data-driven init / PTQ
    # training: the runner's loop (with method.extra_loss, method.param_groups,
    # method.on_step) unless method.train(model, ctx) returns True (it owned the phase)
    model = method.finalize(model)                       # freeze, fold, export
    method.footprint(model)                              # what is stored, at how many bits
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .registry import Registry


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    venue: str
    year: int
    url: str = ""
    code: str = ""

    def cite(self) -> str:
        return f"{self.authors}, {self.title}, {self.venue} {self.year}"


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class MethodContext:
    """What a method may use beyond the model.

    ``calib_batches()`` yields (x, y) training batches without augmentation for
    calibration; ``teacher`` is the full-precision parent model when there is one;
    ``recipe`` is the cell's resolved training recipe (a dict).
    """

    device: torch.device
    recipe: dict
    calib_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    teacher: nn.Module | None = None
    cell: Any = None
    extras: dict = field(default_factory=dict)


class Method:
    """Base class of every method. Subclasses set ``name``, ``paper`` and override hooks."""

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    #: deviations from the paper/official code, shown in the leaderboard's comment column
    comment: ClassVar[str] = ""
    #: "baseline": start from the trained full-precision cell; "scratch": from random init
    init: ClassVar[str] = "baseline"
    #: bit-widths the method supports (weights, activations); 32 = full precision
    weight_bits: ClassVar[tuple[int, ...]] = tuple(range(1, 33))
    act_bits: ClassVar[tuple[int, ...]] = tuple(range(1, 33))
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: part of every cell id: bump it when the method's maths change, so its cells run again
    version: ClassVar[int] = 1

    def __init__(self, w_bits: int = 32, a_bits: int = 32, **options: Any):
        self.w_bits = int(w_bits)
        self.a_bits = int(a_bits)
        self.options = self.Options(**options)

    # -- the contract -------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Swap or wrap layers following the paper's first/last-layer policy."""
        return model

    def calibrate(self, model: nn.Module, ctx: MethodContext) -> None:
        """Run ``recipe.calib_batches`` un-augmented training batches through the model in
        eval mode with every quantizer observing, so data-driven initialisations (LSQ's
        step sizes, min-max ranges) happen before training. BatchNorm statistics do not move."""
        from .modules import Quantizer

        batches = int(ctx.recipe.get("calib_batches", 0) or 0)
        quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
        if batches <= 0 or not quantizers:
            return
        was_training = model.training
        model.eval()
        for q in quantizers:
            q.observing = True
        try:
            with torch.no_grad():
                for i, (x, _) in enumerate(ctx.calib_batches()):
                    if i >= batches:
                        break
                    model(x)
        finally:
            for q in quantizers:
                q.observing = False
                q.initialized.fill_(True)
            model.train(was_training)

    def train(self, model: nn.Module, ctx: MethodContext) -> bool:
        """Own the training phase (return True), or leave it to the runner's loop (False)."""
        return False

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss (PACT's alpha decay, Bayesian Bits' regularizer)."""
        return None

    def param_groups(self, model: nn.Module, recipe: dict) -> list[dict] | None:
        """Optimizer parameter groups, or None for the runner's default (weight decay on
        conv/linear weights only, none on BN, biases and quantizer parameters)."""
        return None

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Freeze, fold and export; the returned model is what is evaluated and stored."""
        return model

    def footprint(self, model: nn.Module, example: torch.Tensor | None = None):
        """What is stored and at how many bits, from the real tensors."""
        from .footprint import footprint

        return footprint(model, example)

    def load_parent(self, model: nn.Module, state: dict, parent_method: str) -> None:
        """Initialise from a parent cell's checkpoint. Called before ``prepare`` when the
        parent is full precision, after it when the parent used this same method
        (progressive chains: its quantizer parameters carry over)."""
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(usable, strict=False)


METHODS: Registry[type[Method]] = Registry("method")
_loaded = False


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group="qbench.methods"):
        if ep.name in METHODS._items:
            continue
        cls = ep.load()
        METHODS._items[ep.name] = cls


METHODS._load = _load_entry_points  # type: ignore[method-assign]


def get_method(name: str, where: str | None = None) -> type[Method]:
    return METHODS.get(name, where)
