r"""TWN: Ternary Weight Networks, as a third-party qbench method.

Li and Liu, "Ternary Weight Networks", arXiv:1605.04711, 2016.
https://arxiv.org/abs/1605.04711 (official code: https://github.com/fengfu-chris/caffe-twns).

Every quantized layer's weights :math:`W` (n values) are approximated by :math:`\alpha W^t`
with :math:`W^t_i \in \{-1, 0, +1\}` and one scale :math:`\alpha \ge 0` per layer, minimising
:math:`\|W - \alpha W^t\|_2^2`. The paper's approximate solution:

.. math::
    W^t_i = +1 \text{ if } W_i > \Delta, \quad 0 \text{ if } |W_i| \le \Delta,
    \quad -1 \text{ if } W_i < -\Delta

    \Delta \approx 0.7\, E(|W|) = \frac{0.7}{n} \sum_i |W_i|, \qquad
    \alpha = \frac{1}{|I_\Delta|} \sum_{i \in I_\Delta} |W_i|, \quad
    I_\Delta = \{i : |W_i| > \Delta\}

Both are recomputed from the current full-precision weights at every forward pass. The
gradient reaching :math:`W` is the gradient of the ternary weights, passed straight through
(:math:`\Delta` and :math:`\alpha` are constants in the backward pass), and SGD updates the
full-precision weights, as the paper's training procedure does.

* Activations: the paper ternarizes weights only; the neurons stay in full precision
  (its forward pass is :math:`Z = X * W \approx (\alpha X) \oplus W^t` with a real-valued
  input X). That is the ``A32`` setting. As an extension beyond the paper, ``A2``..``A8``
  quantizes every quantized layer's input with a learned step size (LSQ, Esser et al.,
  ICLR 2020, on qbench's :func:`~qbench.methods.functional.lsq_quantize`): one step per
  tensor, initialised on the first batch to :math:`2\langle|x|\rangle/\sqrt{Q_P}`, gradient
  scale :math:`1/\sqrt{N Q_P}`, a signed grid where the input has negative values then.
* First and last layers: ternarized like every other convolution and fully connected
  layer (``first_last: same``, the default), as in the official Caffe code, where one
  global switch ternarizes every convolution and inner-product layer;
  ``first_last: fp`` keeps both in full precision.
* Storage (footprint): 2 bits per weight (three levels need two bits) plus one 32-bit
  :math:`\alpha` per layer; the bit audit checks that each layer holds at most 3 values.

Deviations (also in :attr:`TWN.comment`): the experiment section of the paper could not be
read while writing this plugin, so the first/last-layer policy follows the official code
rather than the paper's text; a cell is fine-tuned from qbench's full-precision baseline
with the suite's recipe, not trained from scratch with the paper's schedules; ``delta``
(0.7 in the paper) is an option.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from qbench.methods import Method, MethodContext, Paper
from qbench.methods.functional import forward_value, int_range, lsq_quantize
from qbench.methods.modules import Quantizer, quantize_model
from torch import nn

TWN_PAPER = Paper(
    title="Ternary Weight Networks",
    authors="Li, Liu",
    venue="arXiv:1605.04711",
    year=2016,
    url="https://arxiv.org/abs/1605.04711",
    code="https://github.com/fengfu-chris/caffe-twns",
)


def ternarize(w: torch.Tensor, delta_factor: float = 0.7) -> torch.Tensor:
    r"""TWN's ternary approximation :math:`\alpha W^t` of one layer's weights ``w``, with the
    straight-through gradient (``dL/dW = dL/d(alpha W^t)``). The threshold and the scale
    are statistics of the whole tensor, held constant in the backward pass."""
    a = w.detach().abs()
    delta = delta_factor * a.mean()
    keep = a > delta
    alpha = torch.where(keep, a, torch.zeros_like(a)).sum() / keep.sum().clamp_min(1)
    t = torch.where(keep, torch.sign(w.detach()), torch.zeros_like(a))
    return forward_value(w, alpha * t)


class TernaryWeight(Quantizer):
    """A layer's weights as :math:`\\alpha \\{-1, 0, +1\\}` (stored as 2-bit codes and one
    scale). Stateless: threshold and scale come from the current weights."""

    def __init__(self, delta_factor: float = 0.7):
        super().__init__(2)
        self.delta_factor = float(delta_factor)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ternarize(w, self.delta_factor)

    def scale_count(self) -> int:
        return 1  # alpha

    def max_levels(self) -> int:
        return 3  # -alpha, 0, +alpha

    def extra_repr(self) -> str:
        return f"ternary, delta={self.delta_factor}*E|W|"


class LearnedStepAct(Quantizer):
    """A layer's input on a ``bits``-bit grid with a learned step (LSQ). The grid is
    unsigned after a ReLU and signed where the first batch seen has negative values."""

    def __init__(self, bits: int):
        super().__init__(bits)
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self._levels: tuple[int, int] | None = None  # (Q_N, Q_P), read from ``signed`` once

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._levels = None

    def levels(self) -> tuple[int, int]:
        if self._levels is None:
            self._levels = int_range(self.bits, bool(self.signed))
        return self._levels

    @torch.no_grad()
    def _first_batch(self, x: torch.Tensor) -> None:
        self.signed.fill_(bool((x < 0).any()))
        self._levels = None
        q_p = self.levels()[1]
        self.step.copy_((2 * x.float().abs().mean() / math.sqrt(q_p)).clamp_min(1e-8))
        self.mark_initialized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.should_observe() and not self.is_initialized():
            self._first_batch(x.detach())
        q_n, q_p = self.levels()
        g = 1.0 / math.sqrt(x[0].numel() * q_p)
        return lsq_quantize(x, self.step.to(x.dtype), q_n, q_p, g)


class TWNOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: the threshold factor: Delta = delta * E|W| (0.7 in the paper)
    delta: float = Field(0.7, gt=0.0, le=3.0)
    #: "same": first and last layers ternarized too (official code); "fp": full precision
    first_last: Literal["same", "fp"] = "same"


class TWN(Method):
    name = "twn"
    paper = TWN_PAPER
    comment = (
        "per-layer Delta=0.7E|W|, alpha=mean|W| over |W|>Delta, STE; first/last layers ternary as in "
        "the official code (the paper's experiment section was not checked); A<32 is an LSQ extension "
        "(the paper keeps activations full precision); fine-tuned from the FP32 baseline"
    )
    status = "third-party plugin (examples/qbench-twn)"
    weight_bits = (2,)
    act_bits = (*range(2, 9), 32)
    Options = TWNOptions
    version = 1

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        delta = self.options.delta
        return quantize_model(
            model,
            lambda m, n, b: TernaryWeight(delta),
            lambda m, n, b: LearnedStepAct(b),
            self.w_bits,
            self.a_bits,
            first_last=self.options.first_last,
        )
