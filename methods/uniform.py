"""Uniform min-max quantization: the plain baseline every quantization paper compares with.

* Weights: symmetric, per output channel, ``s_c = max|w_c| / Q_P`` with
  ``Q_P = 2^(b-1) - 1`` (the restricted signed range ``[-Q_P, Q_P]``, so zero is exact),
  recomputed from the current weights at every forward pass.
* Activations (a layer's input): asymmetric, per tensor, ``s = (max - min) / (2^b - 1)``,
  zero point ``z = round(-min / s)``; ``min``/``max`` are the extremes seen over the
  calibration batches (post-training quantization), then, if the recipe trains
  (quantization-aware training), tracked by an exponential moving average
  (momentum 0.9) with straight-through rounding.
* Gradients (straight-through, :func:`~qbench.methods.functional.fake_quant`): 1 w.r.t.
  the input wherever its integer code ``round(v/s) + z`` lies in the grid, both end codes
  included, 0 where it was clipped -- the rule of torch's own fake-quantize ops
  (``torch.fake_quantize_per_tensor_affine``). Scales and zero points are statistics of
  the tensors (no gradient).
* First and last layers: 8 bits by default (``first_last`` option).

Version 2: elements whose code lands exactly on an end of the grid keep their gradient
(version 1 took it from ``torch.clamp``, which gives 0 there on recent torch).

References: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (asymmetric activations, EMA ranges);
Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference: A
whitepaper", arXiv:1806.08342, 2018 (symmetric per-channel weights).

On CUDA the quantizers run the fused kernels of :mod:`qbench.methods.fused` (recipe ``fused: false``: this reference).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from . import fused as _fused
from .base import Method, MethodContext, Paper
from .functional import fake_quant
from .modules import Quantizer, per_channel_groups, quantize_model


class MinMaxWeight(Quantizer):
    """Symmetric per-output-channel min-max weight quantizer."""

    def __init__(self, bits: int, channels: int):
        super().__init__(bits)
        self.qp = 2 ** (bits - 1) - 1
        self.channels = channels

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-8)
        return (flat / self.qp).view(-1, *([1] * (w.dim() - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale(w)
        if self.fused and _fused.supported(w):
            return _fused.fused_fake_quant(w, s, self.qp, self.qp)
        return fake_quant(w, s, self.qp, self.qp)

    def scale_count(self) -> int:
        return self.channels  # one stored scale per output channel

    def max_levels(self) -> int:
        return 2 * self.qp + 1

    def groups(self, q: torch.Tensor) -> list[torch.Tensor]:
        return per_channel_groups(q)


class MinMaxAct(Quantizer):
    """Asymmetric per-tensor activation quantizer with observed (then EMA) ranges."""

    def __init__(self, bits: int, momentum: float = 0.9):
        super().__init__(bits)
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or self.training:
            lo, hi = x.detach().min().float(), x.detach().max().float()
            if not self.is_initialized():
                self.lo.copy_(lo)
                self.hi.copy_(hi)
                self.mark_initialized()
            elif self.observing:
                self.lo.copy_(torch.minimum(self.lo, lo))
                self.hi.copy_(torch.maximum(self.hi, hi))
            else:
                self.lo.lerp_(lo, 1 - self.momentum)
                self.hi.lerp_(hi, 1 - self.momentum)
        lo = torch.clamp(self.lo, max=0.0)  # the range always holds zero exactly
        hi = torch.clamp(self.hi, min=0.0)
        qmax = 2**self.bits - 1
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        if self.fused and _fused.supported(x):
            return _fused.fused_fake_quant(x, scale.to(x.dtype), 0, qmax, zero.to(x.dtype))
        return fake_quant(x, scale.to(x.dtype), 0, qmax, zero.to(x.dtype))

    def scale_count(self) -> int:
        return 2  # scale and zero point


class UniformOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_last: Literal["fp", "8bit", "same"] = "8bit"


class Uniform(Method):
    name = "uniform"
    paper = Paper(
        title=("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"),
        authors="Jacob et al.",
        venue="CVPR",
        year=2018,
        url="https://arxiv.org/abs/1712.05877",
    )
    comment = "min-max PTQ; QAT with STE when epochs > 0"
    weight_bits = tuple(range(2, 33))
    act_bits = tuple(range(2, 33))
    Options = UniformOptions
    #: 2: the straight-through gradient also passes at the end codes of the grid
    version = 2

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return quantize_model(
            model,
            lambda m, n, b: MinMaxWeight(b, m.weight.shape[0]),
            lambda m, n, b: MinMaxAct(b),
            self.w_bits,
            self.a_bits,
            first_last=self.options.first_last,
        )
