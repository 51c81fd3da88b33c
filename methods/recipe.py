"""The training recipe: how a cell trains (or calibrates) and evaluates.

Validated with the suite (every level of a suite may set any key; lower levels override
higher ones), stored in the cell's identity as a plain dict, and handed to methods typed,
as :class:`Recipe`, through :class:`qbench.methods.MethodContext`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

#: more epochs than any paper trains (ImageNet recipes are 90-120): a typo, not a plan
MAX_EPOCHS = 10_000


class Recipe(BaseModel):
    """How a cell trains (or calibrates) and evaluates."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    train: bool = True  # false: no training phase (post-training quantization, evaluation)
    epochs: PositiveInt = Field(10, le=MAX_EPOCHS)
    batch_size: PositiveInt = Field(128, le=1_000_000)
    eval_batch_size: PositiveInt = Field(512, le=1_000_000)
    eval_every: PositiveInt = 1  # evaluate on the test (and val) split every N epochs and at the end
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-4
    wd_on: Literal["weights", "all"] = "weights"
    #: hold_linear: constant for the first two thirds of the epochs, then linear to 0
    schedule: Literal["cosine", "step", "onecycle", "constant", "hold_linear"] = "cosine"
    milestones: list[PositiveInt] = []
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: NonNegativeInt = 0
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    calib_batches: NonNegativeInt = 4
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile on CUDA
    grad_clip: PositiveFloat | None = None
    #: GPUs one cell trains on with DistributedDataParallel (one process each; the batch
    #: size and learning rate stay the global ones the recipe names)
    gpus: PositiveInt = Field(1, le=64)
    #: the fused fake-quantizer kernels on CUDA (false: the reference functions of
    #: methods/functional.py, the path the CPU always takes)
    fused: bool = True
    #: with ``compile``: capture the training step in CUDA graphs (``reduce-overhead``)
    #: where shapes are static; a method that changes shapes or reads the host falls back
    cudagraphs: bool = False

    #: keys added after cells were first stored: at these values they are left out of a
    #: cell's identity, so stored cells (and the results bundle) keep their ids
    IDENTITY_DEFAULTS: ClassVar[dict] = {"gpus": 1, "fused": True, "cudagraphs": False}

    def with_(self, **changes) -> Recipe:
        """A copy with ``changes`` applied and validated (e.g. a method's fine-tuning stage)."""
        return Recipe(**{**self.model_dump(), **changes})


def identity_recipe(recipe: dict) -> dict:
    """The part of a resolved recipe that names a cell: every key, except the later-added
    ones (:attr:`Recipe.IDENTITY_DEFAULTS`) while they keep their default value."""
    omit = Recipe.IDENTITY_DEFAULTS
    return {k: v for k, v in recipe.items() if not (k in omit and v == omit[k])}
