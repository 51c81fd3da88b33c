r"""LSQ: Learned Step Size Quantization.

Esser, McKinstry, Bablani, Appuswamy, Modha. "Learned Step Size Quantization", ICLR 2020.
https://arxiv.org/abs/1902.08153 (no official code was released).

For every quantized tensor (each layer's weights, each layer's input activations) a
step size :math:`s` is learned:

.. math::
    \bar v = \lfloor \mathrm{clip}(v/s, -Q_N, Q_P) \rceil, \quad \hat v = \bar v s  \quad (1, 2)

    \partial \hat v / \partial s = -v/s + \lfloor v/s \rceil \text{ if } -Q_N < v/s < Q_P,
    \text{ else } -Q_N \text{ or } Q_P  \quad (3)

with the straight-through estimator for :math:`\partial \hat v / \partial v`.

* Grids: weights signed, :math:`Q_N = 2^{b-1}, Q_P = 2^{b-1}-1`; activations unsigned,
  :math:`Q_N = 0, Q_P = 2^b - 1` (inputs after ReLU). A layer whose input has negative
  values at initialisation (the first layer's normalised image) gets a signed grid.
* Initialisation: :math:`s = 2\langle|v|\rangle / \sqrt{Q_P}` on the first batch (weights:
  the pretrained tensor).
* Gradient scale: :math:`g = 1/\sqrt{N Q_P}`, :math:`N` the number of weights in the
  layer, or the number of features per example for activations.
* First and last layers at 8 bits (weights and activations), as in the paper.
* Recipe (paper): initialise from the full-precision model, SGD with momentum 0.9,
  cosine learning-rate decay; weight decay 1e-4 at 4+ bits, 0.5e-4 at 3, 0.25e-4 at 2.
  The step sizes themselves are trained without weight decay here (the runner's default
  puts none on quantizer parameters).

On CUDA the quantizer runs the fused kernels of :mod:`qbench.methods.fused` (recipe ``fused: false``: this reference).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from . import fused as _fused
from .base import Method, MethodContext, Paper
from .functional import int_range, lsq_quantize
from .modules import Quantizer, quantize_model


class LSQQuantizer(Quantizer):
    """A learned step size for one tensor (weights: signed; activations: signed or not,
    decided at initialisation from the data).

    ``weight=True`` takes N (in the gradient scale) as the tensor's size, otherwise as
    the number of features of one example (the tensor's size over its batch dimension).
    """

    def __init__(self, bits: int, signed: bool | None, weight: bool = False):
        super().__init__(bits)
        self.signed = signed  # None: decide on the first batch
        self.weight = weight
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("is_signed", torch.tensor(bool(signed)))
        self._grid_cache: tuple[int, int] | None = None

    def _grid(self) -> tuple[int, int]:
        # Python ints, read from the buffer once (not every step)
        if self._grid_cache is None:
            self._grid_cache = int_range(self.bits, bool(self.is_signed))
        return self._grid_cache

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._grid_cache = None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.numel() == 0:  # an empty batch (a detector's mask head with no detections): nothing to quantize
            return v
        if self.should_observe() and not self.is_initialized():
            self._init(v)
        qn, qp = self._grid()
        n = v.numel() if self.weight else v[0].numel()  # N_W, or N_F per example
        g = 1.0 / math.sqrt(n * qp)
        s = self.step.to(v.dtype)
        if self.fused and _fused.supported(v):
            return _fused.fused_lsq(v, s, qn, qp, g)
        return lsq_quantize(v, s, qn, qp, g)

    @torch.no_grad()
    def _init(self, v: torch.Tensor) -> None:
        """s = 2<|v|>/sqrt(Q_P) (sec. 2.1), from the pretrained weights or the first batch."""
        if self.signed is None:
            self.is_signed.fill_(bool((v < 0).any()))
            self._grid_cache = None
        _, qp = self._grid()
        self.step.copy_((2 * v.detach().float().abs().mean() / math.sqrt(qp)).clamp_min(1e-8))
        self.mark_initialized()


def weight_quantizer(bits: int) -> LSQQuantizer:
    return LSQQuantizer(bits, signed=True, weight=True)


class LSQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_last: Literal["fp", "8bit", "same"] = "8bit"


class LSQ(Method):
    name = "lsq"
    paper = Paper(
        title="Learned Step Size Quantization",
        authors="Esser, McKinstry, Bablani, Appuswamy, Modha",
        venue="ICLR",
        year=2020,
        url="https://arxiv.org/abs/1902.08153",
    )
    comment = "no weight decay on step sizes; signed activation grid where a layer's input has negatives"
    weight_bits = tuple(range(2, 33))
    act_bits = tuple(range(2, 33))
    Options = LSQOptions

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        model = quantize_model(
            model,
            lambda m, n, b: weight_quantizer(b),
            lambda m, n, b: LSQQuantizer(b, signed=None),
            self.w_bits,
            self.a_bits,
            first_last=self.options.first_last,
        )
        # weights are known now: initialise their steps from the pretrained tensors
        for m in model.modules():
            wq = getattr(m, "weight_quantizer", None)
            if isinstance(wq, LSQQuantizer) and not wq.is_initialized():
                wq._init(m.weight)
        return model
