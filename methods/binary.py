r"""Binary (1-bit) primitives shared by the binary-network methods (XNOR-Net, XNOR-Net++,
Bi-Real Net, Group-Net): sign with its gradient rules, weight binarisation
with analytic or learned scales, 1-bit quantizers and the binary Conv2d/Linear layers.

Sign (forward), with ``sign(0) = +1`` so that a binarised tensor holds exactly two values
(torch's ``sign`` gives 0 there, a third value the bit audit would count):

.. math::
    \mathrm{sign}(x) = +1 \text{ if } x \ge 0, \text{ else } -1

Gradient rules of sign (``SignGrad``; the names are the EasyQuantization keywords
``fm_STE``, ``fm_triangle``, ``wt_pass``):

* ``"pass"``: :math:`\partial\,\mathrm{sign}(x)/\partial x = 1` (identity straight-through);
* ``"STE"``: :math:`1_{|x| \le 1}` (the clipped straight-through estimator of Hubara et al.,
  which XNOR-Net uses, sec. 3.2), bounds included;
* ``"triangle"``: :math:`\max(0, 2 - 2|x|)`, the derivative of the piecewise quadratic
  ApproxSign of Bi-Real Net (Liu et al., ECCV 2018, eq. 5): a triangle of height 2 and area
  2, the size of sign's jump.

Weights (``binary_weight``), one scale per output channel (``"channel"``), per tensor
(``"tensor"``) or none (``"none"``, the values are ±1):

.. math::
    \tilde W = \alpha\,\mathrm{sign}(W), \quad \alpha_o = \tfrac{1}{n}\lVert W_o \rVert_{\ell 1}
    \quad (\text{XNOR-Net eq. 6; } n \text{ weights per output channel})

with the weight gradient rules (``WeightGrad``): ``"pass"`` (identity, alpha held
constant), ``"STE"`` (:math:`1_{|W| \le 1}`, alpha held constant), ``"paper"``, XNOR-Net's
sec. 3.2 rule :math:`\partial C/\partial W_i = \partial C/\partial \tilde W_i\,(1/n + \alpha\,1_{|W_i| \le 1})`,
and ``"magnitude"``, Bi-Real Net's magnitude-aware gradient (sec. 3.2, the 1/n term dropped
as the paper does): :math:`\partial C/\partial \tilde W_i\,\alpha\,1_{|W_i| \le 1}`.

Storage: a binary tensor is 1 bit per element plus its real-valued scales
(:meth:`BinaryQuantizer.scale_count`); the bit audit counts at most ``max_levels() = 2``
distinct values per scale group (per output channel for ``"channel"``). BOPs of a binary
layer are its MACs x 1 x 1 (qbench's footprint already counts ``MACs x b_w x b_a``).

Every function here is elementwise or reduces over explicit dimensions and never reads a
tensor back to the host, so it traces into one graph under ``torch.compile``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .functional import forward_value
from .modules import QuantConv2d, Quantizer, QuantLinear, per_channel_groups, set_submodule

SignGrad = Literal["pass", "STE", "triangle"]
WeightGrad = Literal["pass", "STE", "paper", "magnitude"]
Scaling = Literal["channel", "tensor", "none"]


# -- functions -----------------------------------------------------------------------------


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0``, else ``-1`` (no gradient)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one).detach()


def sign_grad(x: torch.Tensor, rule: str) -> torch.Tensor:
    """The derivative of sign that ``rule`` ("pass", "STE", "triangle") substitutes, at x."""
    x = x.detach()
    if rule == "pass":
        return torch.ones_like(x)
    if rule == "STE":
        return (x.abs() <= 1).to(x.dtype)
    if rule == "triangle":
        return (2 - 2 * x.abs()).clamp_min(0)
    raise ValueError(f"sign gradient rule must be 'pass', 'STE' or 'triangle', got {rule!r}")


def surrogate(x: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass; in the backward pass the gradient reaching x is
    multiplied by ``grad`` (a detached tensor broadcasting against x)."""
    return forward_value(x * grad, value)


def sign_ste(x: torch.Tensor, rule: str = "STE") -> torch.Tensor:
    """sign(x) (``sign(0) = +1``) with the gradient rule ``rule`` ("pass", "STE", "triangle")."""
    return surrogate(x, binary_sign(x), sign_grad(x, rule))


def _reduce_dims(w: torch.Tensor, scaling: str) -> tuple[int, ...]:
    if scaling == "channel":
        return tuple(range(1, w.dim()))
    if scaling == "tensor":
        return tuple(range(w.dim()))
    raise ValueError(f"scaling must be 'channel', 'tensor' or 'none', got {scaling!r}")


def mean_abs(w: torch.Tensor, scaling: str = "channel") -> torch.Tensor:
    """XNOR-Net's optimal scale ``alpha = ||W||_1 / n`` (eq. 6): per output channel (shape
    [C, 1, ..., 1]) or per tensor (shape [1, ..., 1]); differentiable."""
    return w.abs().mean(dim=_reduce_dims(w, scaling), keepdim=True)


def binary_weight(w: torch.Tensor, scaling: str = "channel", rule: str = "pass") -> torch.Tensor:
    """``alpha * sign(W)`` with alpha the mean absolute value per ``scaling`` group ("channel",
    "tensor"; "none": alpha = 1), and the weight gradient rule ``rule``:

    * "pass": dW~/dW = 1; "STE": 1 where |W| <= 1, else 0 (alpha held constant in both);
    * "paper" (XNOR-Net sec. 3.2): 1/n + alpha 1_{|W| <= 1}, n the size of the scale group;
    * "magnitude" (Bi-Real Net's magnitude-aware gradient): alpha 1_{|W| <= 1}.
    """
    b = binary_sign(w)
    if scaling == "none":
        alpha = torch.ones((), dtype=w.dtype, device=w.device)
        n = 1
    else:
        alpha = mean_abs(w.detach(), scaling)
        n = w[0].numel() if scaling == "channel" else w.numel()
    if rule == "paper":
        grad = 1.0 / n + alpha * sign_grad(w, "STE")
    elif rule == "magnitude":
        grad = alpha * sign_grad(w, "STE")
    elif rule in ("pass", "STE"):
        grad = sign_grad(w, rule)
    else:
        raise ValueError(f"weight gradient rule must be 'pass', 'STE', 'paper' or 'magnitude', got {rule!r}")
    return surrogate(w, alpha * b, grad)


def xnor_input_scale(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    r"""XNOR-Net's activation scale K (sec. 3.2): :math:`A = \sum_c |I_{c,:,:}| / c`, then
    :math:`K = A * k` with k the box filter :math:`1/(w h)` of the layer's kernel size,
    stride, padding (zeros) and dilation. A Linear layer's K is the mean of |x| over its
    features, one per example. Differentiable (autograd through |x|)."""
    if isinstance(layer, nn.Conv2d):
        a = x.abs().mean(dim=1, keepdim=True)
        kh, kw = layer.kernel_size
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=a.dtype, device=a.device)
        return F.conv2d(a, box, None, layer.stride, layer.padding, layer.dilation)
    return x.abs().mean(dim=-1, keepdim=True)


# -- quantizers ----------------------------------------------------------------------------


class BinaryQuantizer(Quantizer):
    """Base of the 1-bit quantizers: ``bits = 1``, two values per scale group. Binary
    quantizers need no data-driven initialisation: they are born initialised."""

    def __init__(self) -> None:
        super().__init__(1)
        self.mark_initialized()

    def max_levels(self) -> int:
        return 2


class SignActivation(BinaryQuantizer):
    """sign(x) with the gradient rule ``grad`` ("pass", "STE", "triangle"); stores nothing."""

    def __init__(self, grad: SignGrad = "STE"):
        super().__init__()
        sign_grad(torch.zeros(()), grad)  # validate now, not on the first batch
        self.grad = grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x, self.grad)

    def scale_count(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"bits=1, grad={self.grad}"


class SignWeight(BinaryQuantizer):
    """``alpha * sign(W)`` with analytic alpha = mean |W| per output channel ("channel"), per
    tensor ("tensor") or none ("none"), and the weight gradient rule ``grad``. Stores one
    real scale per group (computed from W, so no parameter)."""

    def __init__(self, channels: int, scaling: Scaling = "channel", grad: WeightGrad = "pass"):
        super().__init__()
        if scaling not in ("channel", "tensor", "none"):
            raise ValueError(f"scaling must be 'channel', 'tensor' or 'none', got {scaling!r}")
        if grad not in ("pass", "STE", "paper", "magnitude"):
            raise ValueError(f"weight gradient rule must be 'pass', 'STE', 'paper' or 'magnitude', got {grad!r}")
        self.channels = int(channels)
        self.scaling = scaling
        self.grad = grad

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return binary_weight(w, self.scaling, self.grad)

    def scale_count(self) -> int:
        return {"channel": self.channels, "tensor": 1, "none": 0}[self.scaling]

    def groups(self, q: torch.Tensor) -> list[torch.Tensor]:
        return per_channel_groups(q) if self.scaling == "channel" else [q]

    def extra_repr(self) -> str:
        return f"bits=1, scaling={self.scaling}, grad={self.grad}"


# -- layers --------------------------------------------------------------------------------


class _BinaryMixin:
    """A binary layer's output: ``(act_quantizer(x) (*) weight_quantizer(W)) * K * S + bias``,
    K the XNOR-Net input scale when ``input_scale`` is set, S the weight quantizer's optional
    ``output_scale(out)`` (learned spatial factors), the bias added after the scales."""

    input_scale: bool = False

    def _scale(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.input_scale and self.act_quantizer.enabled:
            out = out * xnor_input_scale(x, self)
        scale_of = getattr(self.weight_quantizer, "output_scale", None)
        scale = scale_of(out) if scale_of is not None else None
        return out if scale is None else out * scale


class BinaryConv2d(_BinaryMixin, QuantConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(self.act_quantizer(x), self.quantized_weight(), None)
        out = self._scale(x, out)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class BinaryLinear(_BinaryMixin, QuantLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.act_quantizer(x), self.quantized_weight())
        out = self._scale(x, out)
        return out if self.bias is None else out + self.bias


def binarize_layers(model: nn.Module, input_scale: bool = False) -> nn.Module:
    """Turn every QuantConv2d/QuantLinear whose weight quantizer is binary into a
    :class:`BinaryConv2d`/:class:`BinaryLinear` (in place; same parameters and quantizers),
    with XNOR-Net's input scale K when ``input_scale``. Call after :func:`quantize_model`."""
    for m in model.modules():
        if not isinstance(getattr(m, "weight_quantizer", None), BinaryQuantizer):
            continue
        if type(m) is QuantConv2d:
            m.__class__ = BinaryConv2d
        elif type(m) is QuantLinear:
            m.__class__ = BinaryLinear
        else:
            continue
        m.input_scale = bool(input_scale)
    return model


def drop_relus(model: nn.Module) -> int:
    """Replace every ``nn.ReLU`` module of ``model`` with ``nn.Identity`` (the dashboard's
    ``No-ReLU``: sign of a ReLU output is +1 everywhere). Returns how many were replaced.
    ``F.relu`` calls inside a model's ``forward`` are not reached."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    for name in names:
        set_submodule(model, name, nn.Identity())
    return len(names)
