r"""PACT: Parameterized Clipping Activation.

Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan. "PACT: Parameterized
Clipping Activation for Quantized Neural Networks", arXiv:1805.06085, 2018.
https://arxiv.org/abs/1805.06085 (no official code was released).

Each quantized activation layer learns a clipping level :math:`\alpha` that replaces
ReLU (eq. 1) and sets the quantization range (eq. 2):

.. math::
    y = 0.5\,(|x| - |x - \alpha| + \alpha) =
        \begin{cases} 0 & x \in (-\infty, 0) \\ x & x \in [0, \alpha) \\
                      \alpha & x \in [\alpha, +\infty) \end{cases}  \quad (1)

    y_q = \mathrm{round}\big(y (2^k - 1) / \alpha\big)\, \alpha / (2^k - 1)  \quad (2)

    \partial y_q / \partial \alpha = (\partial y_q / \partial y)(\partial y / \partial \alpha)
        = \begin{cases} 0 & x \in (-\infty, \alpha) \\
                        1 & x \in [\alpha, +\infty) \end{cases}  \quad (3)

with the straight-through estimator :math:`\partial y_q / \partial y = 1`.
:math:`\alpha` is trained with an L2 penalty :math:`\frac{\lambda_\alpha}{2}\alpha^2` (sec. 3),
added to the loss by :meth:`PACT.extra_loss` (its gradient equals a weight decay of
:math:`\lambda_\alpha` on :math:`\alpha`).

* Weights: DoReFa-Net's quantizer (eq. 9 of DoReFa), as the paper does.
* First and last layers in full precision (``first_last="fp"``), as in the paper.
* ``alpha_init`` (default 10) is the starting clipping level of every layer;
  ``alpha_decay`` is :math:`\lambda_\alpha` (default: the recipe's weight decay).
  A network fine-tuned from a trained baseline, whose activations sit well below 10,
  learns faster from a lower start (the digits suite uses 3): :math:`\alpha` only
  receives gradient from the elements above it.

Deviations: the PACT function sits on each quantized layer's input (qbench's layer
wrapper) instead of replacing the ReLU; after a ReLU, :math:`\mathrm{PACT}(\mathrm{relu}(x)) =
\mathrm{PACT}(x)`, but a ReLU output read by two layers (a ResNet block's first conv and
its projection shortcut) gets one :math:`\alpha` per reading layer. Training starts from
the full-precision baseline (the paper trains from scratch).

On CUDA the quantizers run the fused kernels of :mod:`qbench.methods.fused` (recipe ``fused: false``: this reference).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from . import fused as _fused
from .base import Method, MethodContext, Paper
from .dorefa import DoReFaWeight, first_last_policy
from .functional import pact_quantize
from .modules import Quantizer, quantize_model


class PACTAct(Quantizer):
    """PACT activation quantizer: a learnable clipping level ``alpha`` (eq. 1-3), starting
    at ``alpha_init``. Nothing is initialised from data."""

    def __init__(self, bits: int, alpha_init: float = 10.0):
        super().__init__(bits)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.mark_initialized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and _fused.supported(x):
            return _fused.fused_pact(x, self.alpha, self.bits)
        return pact_quantize(x, self.alpha, self.bits)


class PACTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_last: Literal["paper", "fp", "8bit", "same"] = "fp"
    alpha_init: float = Field(10.0, gt=0.0)
    alpha_decay: float | None = Field(None, ge=0.0)


class PACT(Method):
    name = "pact"
    paper = Paper(
        title="PACT: Parameterized Clipping Activation for Quantized Neural Networks",
        authors="Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan",
        venue="arXiv:1805.06085",
        year=2018,
        url="https://arxiv.org/abs/1805.06085",
    )
    comment = (
        "weights: DoReFa; one alpha per quantized layer input (a ReLU output read by two "
        "layers gets two); fine-tuned from the FP32 baseline"
    )
    weight_bits = tuple(range(1, 33))
    act_bits = tuple(range(1, 33))
    Options = PACTOptions

    def __init__(self, w_bits: int = 32, a_bits: int = 32, **options):
        super().__init__(w_bits, a_bits, **options)
        self._decay = 0.0

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        decay = self.options.alpha_decay
        if decay is None:
            decay = ctx.recipe.weight_decay
        self._decay = decay
        return quantize_model(
            model,
            lambda m, n, b: DoReFaWeight(b),
            lambda m, n, b: PACTAct(b, self.options.alpha_init),
            self.w_bits,
            self.a_bits,
            first_last=first_last_policy(self.options.first_last),
        )

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """``lambda_alpha / 2 * sum(alpha^2)`` over every PACT layer (sec. 3)."""
        if not self._decay:
            return None
        alphas = [m.alpha for m in model.modules() if isinstance(m, PACTAct)]
        if not alphas:
            return None
        return 0.5 * self._decay * torch.stack([a.square() for a in alphas]).sum()
