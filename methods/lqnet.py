r"""LQ-Nets: learned quantizers, fitted by alternating least squares during training.

Zhang, Yang, Ye, Hua. "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep
Neural Networks", ECCV 2018. https://arxiv.org/abs/1807.10029
(official code, TensorFlow/tensorpack: https://github.com/microsoft/LQ-Nets).

A K-bit quantizer has a basis :math:`v \in \mathbb{R}^K` and maps x to the nearest of the
levels :math:`v^T e_l`, :math:`e_l \in \{-1, 1\}^K` (weights) or :math:`\{0, 1\}^K`
(activations), :math:`l = 1 \dots 2^K` (eq. 4-5):

.. math::
    Q(x, v) = v^T e_l, \quad \text{if } x \in (t_l, t_{l+1}], \qquad
    t_l = \tfrac12 (v^T e_{l-1} + v^T e_l) \text{ over the sorted levels.}

Quantization Error Minimization (QEM, Algorithm 1) fits the basis to the data by
alternating: (1) codes: each x takes its nearest level's code (the line above);
(2) basis: the least-squares solution for fixed codes,

.. math::
    v^* = (B^T B)^{-1} B^T x \qquad (B: \text{one row } e^T \text{ per element}),

then a moving average :math:`v \leftarrow 0.9\, v + 0.1\, v^*`. As in the official
code, one QEM step runs in every training forward pass (the basis is not trained by
gradient) on the current batch (activations) or the current weights; the weights'
normal equations carry the official ridge :math:`B^TB + \delta I`,
:math:`B^Tx + \delta v` with :math:`\delta = 10^{-4}`.

* One basis per output channel for weights, one per layer for activations.
* Initial basis (official code): weights :math:`v_j = 2^j \cdot 0.6745 \sqrt{2/n}/2^{K-1}`,
  :math:`n` = kernel area x output channels (the He-init fan-out);
  activations :math:`v_j = 2^j \cdot 0.6745 \cdot 2/(2^K - 1)`.
* Gradients (straight-through): weights :math:`\partial Q/\partial x = 1`; activations
  :math:`\partial Q/\partial x = 1` below the largest level, 0 above (the official
  ``x_clip = min(x, max level)``).
* First and last layers in full precision, weights and inputs (official ResNet code).
* Ternary (the EasyQuantization dashboard's ``ter``): with ``ternary: true``, every 2-bit
  quantizer becomes a one-element basis with codes {-1, 0, +1} (weights: levels
  {-v, 0, v}) or {0, 1, 2} (activations: levels {0, v, 2v}), fitted by the same QEM
  step; it is stored at 2 bits and audited at 3 levels.

Deviations: the activations' normal equations get the same ridge as the weights' (the
official code inverts :math:`B^TB` alone, which is singular when a bit is unused in a
batch); the ternary code set is qbench's (the paper quantizes to 2^K levels only);
the QEM step also runs on calibration batches, so a fine-tuned model's activation
bases start from the data; training starts from the full-precision baseline (the
official code trains from scratch).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .base import Method, MethodContext, Paper
from .functional import (
    binary_codes,
    forward_value,
    lq_levels,
    lq_quantize,
    qem_basis,
    ternary_codes,
)
from .modules import Quantizer, per_channel_groups, quantize_model

NORM_PPF_0_75 = 0.6745  # the 0.75 quantile of the standard normal (official init)
MOVING_AVERAGE = 0.9  # the official ``MOVING_AVERAGES_FACTOR``
DELTA = 1e-4  # the official ridge ``EPS``


class LQQuantizer(Quantizer):
    """LQ-Net quantizer for weights (``signed``, one basis per output channel) or
    activations (unsigned, one basis per layer).

    Buffers: ``basis`` [K, G] (stored beside the codes); ``codes`` [L, K], the constant
    code table (not stored: non-persistent). ``momentum`` is the moving average factor
    of the QEM update.
    """

    def __init__(
        self,
        bits: int,
        signed: bool,
        groups: int = 1,
        fan: int = 1,
        ternary: bool = False,
        momentum: float = MOVING_AVERAGE,
    ):
        super().__init__(bits)
        self.signed = signed
        self.ternary = bool(ternary) and bits == 2
        self.momentum = momentum
        codes = ternary_codes(signed) if self.ternary else binary_codes(bits, signed)
        k, num_levels = codes.shape[1], codes.shape[0]
        if signed:
            base = NORM_PPF_0_75 * math.sqrt(2.0 / fan) / 2 ** (k - 1)
        else:
            base = NORM_PPF_0_75 * 2.0 / (num_levels - 1)
        init = torch.tensor([base * 2**j for j in range(k)]).unsqueeze(1).repeat(1, groups)
        self.register_buffer("basis", init)
        self.register_buffer("codes", codes, persistent=False)
        self.mark_initialized()  # the official init is not data-driven

    def max_levels(self) -> int:
        return int(self.codes.shape[0])

    def groups(self, q: torch.Tensor) -> list[torch.Tensor]:
        return per_channel_groups(q) if self.signed else [q]

    def extra_repr(self) -> str:
        kind = "ternary" if self.ternary else f"bits={self.bits}"
        return f"{kind}, {'weights' if self.signed else 'activations'}, groups={self.basis.shape[1]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.basis.shape[1]
        levels, sorted_codes = lq_levels(self.basis, self.codes)
        with torch.no_grad():
            rows = x.detach().float().reshape(groups, -1)  # [G, M]: per channel, or all
            q, idx = lq_quantize(rows, levels)
            if self.training or self.observing:
                self._qem_step(rows, idx, sorted_codes)
            # back to x's shape and memory format (channels_last stays channels_last)
            q = torch.empty_like(x).copy_(q.view(x.shape))
        if self.signed:
            return forward_value(x, q)
        # activations: the gradient stops above the largest level (official ``x_clip``)
        top = levels[:, -1].max().to(x.dtype)
        return forward_value(torch.minimum(x, top), q)

    def _qem_step(self, rows: torch.Tensor, idx: torch.Tensor, sorted_codes: torch.Tensor) -> None:
        new = qem_basis(rows, idx, sorted_codes, self.basis, DELTA)
        self.basis.lerp_(new, 1.0 - self.momentum)


class LQNetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_last: Literal["fp", "8bit", "same"] = "fp"
    ternary: bool = Field(False, description="2-bit quantizers take 3 levels (ter)")


class LQNet(Method):
    name = "lqnet"
    paper = Paper(
        title="LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks",
        authors="Zhang, Yang, Ye, Hua",
        venue="ECCV",
        year=2018,
        url="https://arxiv.org/abs/1807.10029",
        code="https://github.com/microsoft/LQ-Nets",
    )
    comment = (
        "ridge on the activations' QEM too; QEM also on calibration batches; "
        "fine-tuned from the FP32 baseline; ternary = one basis, codes {-1,0,1}/{0,1,2}"
    )
    weight_bits = (*range(1, 9), 32)
    act_bits = (*range(1, 9), 32)
    Options = LQNetOptions

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        ternary = self.options.ternary

        def make_weight(m: nn.Module, name: str, bits: int) -> LQQuantizer:
            out = m.weight.shape[0]
            area = m.weight[0, 0].numel() if m.weight.dim() > 2 else 1
            return LQQuantizer(bits, signed=True, groups=out, fan=area * out, ternary=ternary)

        def make_act(m: nn.Module, name: str, bits: int) -> LQQuantizer:
            return LQQuantizer(bits, signed=False, groups=1, ternary=ternary)

        return quantize_model(
            model,
            make_weight,
            make_act,
            self.w_bits,
            self.a_bits,
            first_last=self.options.first_last,
        )
