"""The method plugin contract.

A method is a :class:`Method` subclass registered under a name, in this package or in
any installed distribution through the entry-point group ``qbench.methods``
(``[project.entry-points."qbench.methods"] mymethod = "mypkg.mod:MyMethod"``). The
core never imports a method by name: qbench's own methods are registered through the
same entry points as a third party's. Entry points are loaded lazily, one name at a
time: a plugin that fails to import costs only itself (a one-line warning naming its
distribution), and two distributions registering one name is an error naming both.

A distribution may also ship the numbers its paper reported: the entry-point group
``qbench.reported`` names a package whose ``*.yaml`` files follow
:mod:`qbench.leaderboard.reported`'s format.

Life of a cell, as the runner drives it (every hook it calls is declared here)::

    method = MethodCls(w_bits, a_bits, **options)       # options validated by ``Options``
    method.notation()                                   # the run's qbench.notation tag (A/W label)
    method.load_parent(model, state, "fp32")            # from the full-precision parent
    model = method.prepare(model, ctx)                  # swap/wrap layers
    method.load_parent(model, state, method.name)       # progressive chains: after prepare
    method.calibrate(model, ctx)                        # optional, data-driven init / PTQ
    # training: ``method.train(model, ctx)`` owns it when it returns True (it may call
    # ``ctx.fit`` for stages that are ordinary epochs); else the runner's loop, i.e.
    # ``ctx.fit`` with method.extra_loss, method.param_groups and method.on_step
    model = method.finalize(model)                      # freeze, fold, export
    method.footprint(model)                             # what is stored, at how many bits

``qbench evaluate`` calls ``method.import_checkpoint`` for a paper's released files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .errors import QbenchError
from .recipe import Recipe
from .registry import Registry, did_you_mean

Batch = tuple[torch.Tensor, torch.Tensor]


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


class Fit(Protocol):
    """The harness's training loop, offered to methods that own their training.

    Runs ``epochs`` (default: the recipe's) epochs of ``model`` over the training split with
    the runner's optimizer and schedule built from ``recipe`` (default: the cell's) and
    ``param_groups`` (default: the method's, else weight decay on conv/linear weights);
    ``loss_fn(model, x, y, out) -> loss`` replaces the cross-entropy (a distillation loss,
    say); ``extra_loss`` and ``on_step`` default to the method's hooks. Evaluates and logs
    curves like any cell, checkpoints every epoch under ``stage`` (a short identifier) and
    resumes a killed stage where it stopped; a finished stage returns at once. Returns the
    stage's history (best test top-1 and its epoch, elapsed seconds).
    """

    def __call__(
        self,
        model: nn.Module,
        *,
        stage: str = "train",
        epochs: int | None = None,
        recipe: Recipe | None = None,
        param_groups: list[dict] | None = None,
        loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        extra_loss: Callable[[nn.Module], torch.Tensor | None] | None = None,
        on_step: Callable[[nn.Module, int], None] | None = None,
    ) -> dict: ...


def _no_batches() -> Iterable[Batch]:
    return iter(())


def _no_log(metrics: Mapping[str, float], step: int | None = None) -> None:
    return None


def _no_fit(model: nn.Module, **kwargs: Any) -> dict:
    raise RuntimeError("this context has no training loop (evaluation or benchmarking only)")


def _no_eval(model: nn.Module) -> dict[str, float]:
    raise RuntimeError("this context has no evaluation split")


@dataclass
class MethodContext:
    """Everything a method may use beyond the model; the harness fills it in.

    - ``device``; ``recipe``: the cell's resolved, typed :class:`Recipe`;
    - ``calib_batches()``: un-augmented training batches (x, y) for calibration and
      statistics (as many as the method reads: stop early);
    - ``train_batches()``: one epoch of augmented, shuffled training batches (drop-last);
    - ``teacher``: the full-precision parent model in eval mode, when the method declares
      ``needs_teacher`` and the cell has a full-precision parent;
    - ``log(metrics, step)``: record metrics (curves with ``step``) in the cell's run;
    - ``evaluate(model)``: top-1/top-5/loss on the test split;
    - ``fit(model, ...)``: the harness's epoch loop (see :class:`Fit`), resumable per stage;
    - ``save_state(state)`` / ``load_state()``: the method's own resumable state between
      stages (tensors, numbers, strings and containers: it is loaded with
      ``weights_only=True``); ``load_state()`` is None on a fresh start;
    - ``seed`` and ``cell_id`` of the cell.
    """

    device: torch.device
    recipe: Recipe
    calib_batches: Callable[[], Iterable[Batch]] = _no_batches
    train_batches: Callable[[], Iterable[Batch]] = _no_batches
    teacher: nn.Module | None = None
    log: Callable[..., None] = _no_log
    evaluate: Callable[[nn.Module], dict[str, float]] = _no_eval
    fit: Fit = field(default=_no_fit)  # type: ignore[assignment]
    save_state: Callable[[dict], None] = lambda state: None
    load_state: Callable[[], dict | None] = lambda: None
    seed: int = 0
    cell_id: str = ""


def calib_example(model: nn.Module, ctx: MethodContext) -> torch.Tensor | None:
    """One sample of the first calibration batch, on the model's device in float32 (None
    when there is no batch): the example input for counting MACs or tracing the model."""
    for x, _ in ctx.calib_batches():
        p = next(model.parameters(), None)
        return x[:1].to(p.device if p is not None else x.device, torch.float32)
    return None


class Method:
    """Base class of every method. Subclasses set ``name``, ``paper`` and override hooks."""

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    #: deviations from the paper/official code, shown in the leaderboard's comment column
    comment: ClassVar[str] = ""
    #: how far the implementation goes, shown on the leaderboard's methods page
    #: (e.g. "reproduced", "follows the official code", "experimental")
    status: ClassVar[str] = ""
    #: "baseline": start from the trained full-precision cell; "scratch": from random init
    init: ClassVar[str] = "baseline"
    #: bit-widths the method supports (weights, activations); 32 = full precision
    weight_bits: ClassVar[tuple[int, ...]] = tuple(range(1, 33))
    act_bits: ClassVar[tuple[int, ...]] = tuple(range(1, 33))
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: part of every cell id: bump it when the method's maths change, so its cells run again
    version: ClassVar[int] = 1
    #: the harness builds ``ctx.teacher`` (the full-precision parent) for this method
    needs_teacher: ClassVar[bool] = False

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

        batches = ctx.recipe.calib_batches
        quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
        if batches <= 0 or not quantizers:
            return
        was_training = model.training
        try:
            with self.calibration_mode(model):
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
                        q.mark_initialized()
        finally:
            model.train(was_training)

    @contextmanager
    def calibration_mode(self, model: nn.Module) -> Iterator[None]:
        """The state the model calibrates in (:meth:`calibrate` restores its training flag
        afterwards): eval mode. A method whose paper initialises its ranges on a training-mode
        pass overrides this."""
        model.eval()
        yield

    def train(self, model: nn.Module, ctx: MethodContext) -> bool:
        """Own the training phase (return True), or leave it to the runner's loop (False)."""
        return False

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss (PACT's alpha decay, Bayesian Bits' regularizer)."""
        return None

    def param_groups(self, model: nn.Module, recipe: Recipe) -> list[dict] | None:
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

    def notation(self) -> str:
        """How the leaderboard writes this configuration when the bits alone do not say it
        (e.g. the product-quantization regime: ``small blocks``, ``large blocks``); empty when
        the W/A bits do. The runner records it as the run's ``qbench.notation`` tag; it must
        equal the ``notation`` of the reported rows the run is compared with (a run and a
        reported row that both carry one meet only when they agree)."""
        return ""

    def import_checkpoint(self, obj: Any, model: nn.Module, where: str | None = None) -> None:
        """Load a paper's released checkpoint (already read with ``weights_only=True``) into
        ``model`` prepared by this method (``qbench evaluate --format official``)."""
        raise QbenchError(f"method {self.name!r} has no importer for released checkpoints", where)

    def load_parent(self, model: nn.Module, state: dict, parent_method: str) -> None:
        """Initialise from a parent cell's checkpoint. Called before ``prepare`` when the
        parent is full precision (every weight must fit), after it when the parent used
        this same method (progressive chains: its quantizer parameters carry over)."""
        if parent_method == "fp32":
            model.load_state_dict(state)
            return
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(usable, strict=False)


def has_importer(method: Method) -> bool:
    """Whether ``method`` overrides :meth:`Method.import_checkpoint`."""
    return type(method).import_checkpoint is not Method.import_checkpoint


def _warn(message: str) -> None:
    print(f"qbench: warning: {message}", file=sys.stderr)


def _dist(ep: EntryPoint) -> str:
    d = getattr(ep, "dist", None)
    return f"{d.metadata['Name']} {d.version}" if d is not None else "an unknown distribution"


class MethodRegistry(Registry[type[Method]]):
    """The methods: entry points of the group ``qbench.methods``, each imported the first
    time its name is asked for. A plugin that fails to import (or is not a ``Method``) is
    an error when its own name is asked for and a one-line warning, naming its
    distribution, when every method is listed; the others still work. One name offered
    by two distributions is an error naming both."""

    GROUP = "qbench.methods"

    def __init__(self) -> None:
        super().__init__("method")
        self._eps: dict[str, list[EntryPoint]] | None = None
        self.errors: dict[str, str] = {}
        self._warned: set[str] = set()

    def _entry_points(self) -> dict[str, list[EntryPoint]]:
        if self._eps is None:
            found: dict[str, list[EntryPoint]] = {}
            for ep in entry_points(group=self.GROUP):
                same = [e for e in found.get(ep.name, []) if e.value == ep.value and _dist(e) == _dist(ep)]
                if not same:  # one distribution seen twice on sys.path is one registration
                    found.setdefault(ep.name, []).append(ep)
            self._eps = found
        return self._eps

    def _resolve(self, name: str) -> type[Method]:
        """Import the entry point ``name``; QbenchError (naming the distribution) on failure."""
        if name in self._items:
            return self._items[name]
        eps = self._entry_points()[name]
        if len(eps) > 1:
            both = " and ".join(f"{_dist(e)} ({e.value})" for e in eps)
            raise QbenchError(f"method name {name!r} is registered twice: by {both}; uninstall one")
        ep = eps[0]
        try:
            cls = ep.load()
        except Exception as e:
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise QbenchError(f"method plugin {name!r} from {_dist(ep)} ({ep.value}) failed to import: {msg}") from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise QbenchError(f"method plugin {name!r} from {_dist(ep)} ({ep.value}) is not a qbench Method subclass")
        self._items[name] = cls
        return cls

    def get(self, name: str, where: str | None = None) -> type[Method]:
        if name not in self._items and name not in self._entry_points():
            raise QbenchError(did_you_mean(name, self.names()).format(kind=self.kind), where)
        try:
            return self._resolve(name)
        except QbenchError as e:
            raise QbenchError(e.message, where) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._entry_points()

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._entry_points()))

    def items(self):
        """Every method that imports, sorted by name; each broken one is skipped with a
        one-line warning on stderr (once per process) and recorded in ``errors``."""
        out = []
        for name in self.names():
            try:
                out.append((name, self._resolve(name)))
            except QbenchError as e:
                self.errors[name] = e.message
                if name not in self._warned:
                    self._warned.add(name)
                    _warn(e.message + "; skipped")
        return iter(out)

    def refresh(self) -> None:
        """Forget what was discovered (after installing a plugin in this process)."""
        self._eps = None
        self._items = {k: v for k, v in self._items.items() if k not in self.errors}
        self.errors.clear()


METHODS = MethodRegistry()


def get_method(name: str, where: str | None = None) -> type[Method]:
    return METHODS.get(name, where)
