r"""DoReFa-Net: low bit-width weights and activations through fixed transforms.

Zhou, Wu, Ni, Zhou, Wen, Zou. "DoReFa-Net: Training Low Bitwidth Convolutional Neural
Networks with Low Bitwidth Gradients", arXiv:1606.06160, 2016.
https://arxiv.org/abs/1606.06160 (official code: tensorpack, ``examples/DoReFa-Net``).

The k-bit quantizer of a real value :math:`r_i \in [0, 1]` (eq. 5), with the
straight-through estimator :math:`\partial c / \partial r_o = \partial c / \partial r_i`:

.. math::
    r_o = \mathrm{quantize}_k(r_i) = \frac{1}{2^k - 1}\,\mathrm{round}\big((2^k - 1)\, r_i\big)

* Weights, k > 1 (eq. 9), per layer:
  :math:`w_q = 2\,\mathrm{quantize}_k\big(\tanh(w) / (2 \max|\tanh(w)|) + 1/2\big) - 1`,
  so :math:`w_q` takes the :math:`2^k` values :math:`2i/(2^k-1) - 1` in [-1, 1] and no
  scale is stored. k = 1 (eq. 8): :math:`w_q = \mathrm{sign}(w)\, E(|w|)`.
* Activations (sec. 2.3): :math:`x_q = \mathrm{quantize}_k(\mathrm{clip}(x, 0, 1))`
  (the official code's ``fa(clip(x, 0, 1))``), applied to every quantized layer's input.
* First and last layers (official code): their weights stay in full precision; the first
  layer's input (the image) is not quantized, the last layer's input is quantized like
  every other activation (``first_last="paper"``).
* Gradients are not quantized here (the paper's G = 32 setting, which is also how the
  dashboard's W/A rows are trained).

Deviations: the activation quantizer sits on each quantized layer's input (qbench's
layer wrapper) rather than replacing the nonlinearity; after a ReLU,
``clip(relu(x), 0, 1) = clip(x, 0, 1)``, so this is the same function wherever a layer's
input is a ReLU output. Training starts from the full-precision baseline (the paper's
ImageNet models train from scratch; the EasyQuantization dashboard fine-tunes).

On CUDA the quantizers run the fused kernels of :mod:`qbench.methods.fused` (recipe ``fused: false``: this reference).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from . import fused as _fused
from .base import Method, MethodContext, Paper
from .functional import dorefa_activation, dorefa_weight
from .modules import Quantizer, quantize_model

DOREFA = Paper(
    title=("DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth Gradients"),
    authors="Zhou, Wu, Ni, Zhou, Wen, Zou",
    venue="arXiv:1606.06160",
    year=2016,
    url="https://arxiv.org/abs/1606.06160",
    code="https://github.com/tensorpack/tensorpack/tree/master/examples/DoReFa-Net",
)

#: first/last-layer policies of the DoReFa-family methods; "paper" is DoReFa's official code
FirstLast = Literal["paper", "fp", "8bit", "same"]


def first_last_policy(option: str) -> str:
    """qbench's :func:`quantize_model` policy name for a DoReFa-family option."""
    return "fp_weights" if option == "paper" else option


class DoReFaWeight(Quantizer):
    """k-bit DoReFa weights (eq. 9; eq. 8 for k = 1). Stateless: the levels are fixed,
    and the 1-bit case stores one scale E(|w|) per layer."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.fused and self.bits > 1 and _fused.supported(w):
            return _fused.fused_dorefa_weight(w, self.bits)
        return dorefa_weight(w, self.bits)

    def scale_count(self) -> int:
        return 1 if self.bits == 1 else 0


class DoReFaAct(Quantizer):
    """k-bit DoReFa activations: clip to [0, 1], then quantize_k. Stateless."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and _fused.supported(x):
            return _fused.fused_dorefa_activation(x, self.bits)
        return dorefa_activation(x, self.bits)


class DoReFaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_last: FirstLast = "paper"


class DoReFa(Method):
    name = "dorefa"
    paper = DOREFA
    comment = (
        "G=32 (gradients not quantized); activation quantizer on each quantized layer's "
        "input; fine-tuned from the FP32 baseline"
    )
    weight_bits = tuple(range(1, 33))
    act_bits = tuple(range(1, 33))
    Options = DoReFaOptions

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return quantize_model(
            model,
            lambda m, n, b: DoReFaWeight(b),
            lambda m, n, b: DoReFaAct(b),
            self.w_bits,
            self.a_bits,
            first_last=first_last_policy(self.options.first_last),
        )
