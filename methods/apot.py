r"""APoT: Additive Powers-of-Two quantization.

Yuhang Li, Xin Dong, Wei Wang. "Additive Powers-of-Two Quantization: An Efficient
Non-uniform Discretization for Neural Networks", ICLR 2020.
https://openreview.net/forum?id=BkgXT24tDS -- official code:
https://github.com/yhhhli/APoT_Quantization (``CIFAR10/models/quant_layer.py``, which
produced the released CIFAR-10 checkpoints, and ``ImageNet/models/quant_layer.py``).

Level sets, for a clipping threshold :math:`\alpha` (built at :math:`\alpha = 1` and
normalised so that the largest level is 1, as the official ``build_power_value``):

.. math::
    \mathcal{Q}^p(\alpha, B) = \alpha \cdot \{0, 2^{-2^B+2}, \dots, 2^{-1}, 1\}
        \qquad\text{(powers of two, PoT)}

    \mathcal{Q}^a(\alpha, kn) = \gamma \cdot \Big\{\sum_{i=0}^{n-1} p_i\Big\},\quad
        p_i \in \{0, 2^{-i}, 2^{-(i+n)}, \dots, 2^{-(i + (2^k-2)n)}\}
        \qquad\text{(additive PoT, APoT, } k = 2)

    \mathcal{Q}^u(\alpha, B) = \alpha \cdot \{0, \tfrac{1}{2^B-1}, \dots, 1\}
        \qquad\text{(uniform)}

where :math:`\gamma` scales the largest level to :math:`\alpha`. An odd ``B`` (3, 5) adds
one single-term ``p`` to the ``(B-1)/2`` two-bit terms, exactly as the official code
enumerates it. Weights of ``b`` bits use sign-magnitude with ``B = b - 1`` magnitude bits;
activations (after ReLU) are unsigned with ``B = b``.

Quantizers. Weights are first standardised (weight normalisation),
:math:`\hat W = (W - \mu_W)/\sigma_W`; then, for a tensor ``x`` and its learned
:math:`\alpha` (the "reparameterised clipping function"),

.. math::
    x_q = \alpha \cdot \Pi_{\mathcal{Q}(1, B)}\big(\mathrm{clip}(x/\alpha, -1, 1)\big)
    \quad\text{(weights, sign-magnitude; activations: see below)}

    \frac{\partial x_q}{\partial \alpha} = \begin{cases}
        \mathrm{sign}(x/\alpha) & |x/\alpha| > 1 \\
        \Pi(x/\alpha) - x/\alpha & \text{otherwise}\end{cases}
    \qquad
    \frac{\partial x_q}{\partial x} = \mathbb{1}_{|x/\alpha| \le 1}\ \text{(straight-through)}

with :math:`\Pi` the projection onto the nearest level. *Calibrated gradient* (2-bit
weights, whose levels are ``{-1, 0, 1}``): :math:`\partial W_q/\partial \hat W = 1`
everywhere, also for clipped weights. *Gradient scale* (ImageNet code, option
``grad_scale``): :math:`\alpha`'s gradient is multiplied by a constant.

The two official implementations differ in training details; option ``variant`` picks one
(the forward values are identical):

* ``cifar`` (``CIFAR10/models/quant_layer.py``, the released CIFAR-10 models): the
  normalisation statistics are constants (no gradient through :math:`\mu, \sigma`); weight
  gradients are never clipped, at any bit-width; activations are clipped from above only
  (``act_quantization``'s ``_uq``: ``input.clamp(max=1)``), so a negative input is
  projected onto the nearest level (0) on the PoT/APoT paths but rounded to a *negative*
  multiple of :math:`1/(2^B-1)` on the uniform path (``power=False``), and its gradients are
  those of ``_uq.backward``: :math:`\partial x_q/\partial x = 1` and
  :math:`\partial x_q/\partial \alpha = \Pi(x/\alpha) - x/\alpha` (blocked / 1 only above
  :math:`\alpha`); :math:`\alpha` starts at 3.0 (weights) and 8.0 (activations); the
  clipping thresholds get their own optimiser groups (activations: lr 0.1, weights:
  lr 0.02, weight decay 1e-4 for both) and every other parameter, BatchNorm included,
  gets the recipe's learning rate and weight decay.
* ``imagenet`` (``ImageNet/models/quant_layer.py``): gradients flow through
  :math:`\mu, \sigma`; weight gradients are clipped outside :math:`[-\alpha, \alpha]`
  except for the calibrated 2-bit weights; activations are clipped to ``[0, 1]`` in both
  directions (``data.clamp(0, 1)``: a negative input gives 0, with no gradient for it or
  for :math:`\alpha`); :math:`\alpha` starts at 3.0 (weights) and 6.0 (activations); all
  parameters share the recipe's learning rate and weight decay.

First and last layers (``first_last: official``, both codes): the first convolution and
the classifier keep their inputs in full precision and their weights at 8 bits,
:math:`W_q = \lfloor W/\max W \cdot 127 \rceil / 127 \cdot \max W` (the maximum, not the
maximum magnitude) with a straight-through gradient; these layers also do so in the
official full-precision ("32-bit") model, which ``W32A32`` here reproduces.

Deviations from the official code (also in :attr:`APoT.comment`):

* Level sets at every width from 2 to 8 bits. The official ``build_power_value`` defines
  APoT magnitudes for ``B`` = 2..6 only (the levels here are identical to it, including its
  float32 normalisation); ``B`` = 1, 7 and 8 (needed for 2-bit APoT weights when not using
  the uniform 2-bit rule, 8-bit weights, 7/8-bit activations) continue the same pattern.
  The CIFAR code itself accepts weights up to 5 bits.
* The projection onto the nearest level is one sorted search over precomputed float32
  decision thresholds (registered buffers, like the level table) instead of the official
  distance-to-every-level matrix: the same result, float rounding of the distances and
  ties included (a tie goes to the level that comes first in the official table's
  order), in linear memory, and it works on channels_last tensors (the official
  ``view(-1)`` fails on them).
* The quantizer computes in float32 under bf16 autocast and returns the input's dtype.

On CUDA the quantizers run the fused kernels of :mod:`qbench.methods.fused` (recipe ``fused: false``: this reference).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from . import fused as _fused
from .base import Method, MethodContext, Paper
from .modules import Identity, Quantizer, quantize_model
from .recipe import Recipe

LevelKind = Literal["apot", "pot", "uniform"]

#: initial clipping thresholds of the official code, per variant: (weights, activations)
ALPHA_INIT = {"cifar": (3.0, 8.0), "imagenet": (3.0, 6.0)}
#: optimiser settings of the clipping thresholds in the official CIFAR-10 ``main.py``
CIFAR_ALPHA_GROUPS = {"act_lr": 0.1, "weight_lr": 0.02, "weight_decay": 1e-4}


# --- level sets --------------------------------------------------------------------------


def _apot_terms(B: int) -> list[list[float]]:
    """The additive terms ``p_i`` (each with its 0) of an APoT magnitude set of ``B`` bits.

    ``B = 2n``: ``n`` terms of 2 bits; term ``t`` takes the exponents ``t+1, t+1+n,
    t+1+2n``. ``B = 2n+1``: the same for the first two rounds, then an extra 1-bit term
    takes the next exponent and the ``n`` terms the ones after it (the official layout for
    B = 3 and 5).
    """
    n = B // 2
    terms: list[list[float]] = [[0.0] for _ in range(n)]
    extra: list[float] = [0.0]
    e = 0
    for rnd in range(3):
        if B % 2 and rnd == 2:
            e += 1
            extra.append(2.0**-e)
        for t in range(n):
            e += 1
            terms[t].append(2.0**-e)
    return terms + ([extra] if B % 2 else [])


def official_level_order(kind: LevelKind, B: int) -> list[float]:
    """Unnormalised magnitudes in the order of the official table: the sums in nested-loop
    order, de-duplicated through a Python set (whose iteration order decides ties)."""
    if kind == "apot":
        sums = [sum(c) for c in itertools.product(*_apot_terms(B))]
    elif kind == "pot":
        sums = [0.0] + [2.0 ** (-i - 1) for i in range(2**B - 1)]
    else:
        raise ValueError(f"no power-of-two table for {kind!r}")
    return list(set(sums))


def level_set(kind: LevelKind, B: int) -> torch.Tensor:
    """The sorted magnitudes of :math:`\\mathcal{Q}(1, B)` in float32 (largest = 1).

    PoT and APoT are normalised as the official code does (float32 multiplication by the
    reciprocal of the largest level); uniform levels are ``k / (2^B - 1)``.
    """
    if not 1 <= B <= 8:
        raise ValueError(f"level sets are defined for 1..8 magnitude bits, got {B}")
    if kind == "uniform":
        n = 2**B - 1
        return torch.arange(n + 1, dtype=torch.float32) / n
    vals = torch.tensor(official_level_order(kind, B), dtype=torch.float32)
    vals = vals * (1.0 / torch.max(vals))
    return torch.unique(vals)  # sorted; PoT at large B underflows to repeated zeros


def _tie_up(kind: LevelKind, B: int, levels: torch.Tensor) -> torch.Tensor:
    """For each pair of neighbouring levels: does an exact tie go to the upper one?
    (the official ``argmin`` returns the first in its table's order)."""
    if kind == "uniform":
        return torch.zeros(max(0, len(levels) - 1), dtype=torch.bool)
    vals = torch.tensor(official_level_order(kind, B), dtype=torch.float32)
    vals = vals * (1.0 / torch.max(vals))
    first: dict[float, int] = {}
    for i, v in enumerate(vals.tolist()):
        first.setdefault(v, i)
    pos = torch.tensor([first[v] for v in levels.tolist()])
    return pos[1:] < pos[:-1]


def decision_thresholds(levels: torch.Tensor, tie_up: torch.Tensor) -> torch.Tensor:
    """For each pair of neighbouring levels (lo, hi), the smallest float32 ``x`` that the
    official rule sends to ``hi``: ``|x - hi| < |x - lo|`` in float32, or equal with the tie
    going up. Found by bisection over the float32 bit patterns between lo and hi (the rule
    is monotone there), so that projecting is one sorted search and the result equals the
    official distance-to-every-level ``argmin`` exactly, rounding of the distances and ties
    included."""
    lo_v, hi_v = levels[:-1].float(), levels[1:].float()
    lo = lo_v.view(torch.int32).long()
    hi = hi_v.view(torch.int32).long()
    a, b = lo + 1, hi.clone()  # the answer lies in (lo, hi]
    while bool((a < b).any()):
        mid = (a + b) // 2
        x = mid.int().view(torch.float32)
        d_lo, d_hi = (x - lo_v).abs(), (x - hi_v).abs()
        up = (d_hi < d_lo) | ((d_hi == d_lo) & tie_up)
        active = a < b
        b = torch.where(active & up, mid, b)
        a = torch.where(active & ~up, mid + 1, a)
    return a.int().view(torch.float32)


def project(x: torch.Tensor, levels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Nearest level of the sorted ``levels`` for every element of ``x`` (float32, any
    memory layout), with the official rounding and ties (see :func:`decision_thresholds`)."""
    perm = None
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        perm = (0, 2, 3, 1)  # work on the dense NHWC view, return the same layout
        x = x.permute(perm)
    q = torch.take(levels, torch.bucketize(x, thresholds, right=True))
    if perm is not None:
        q = q.permute(0, 3, 1, 2)
    return q


# --- the quantization function with the official gradients -------------------------------


def apot_project(x, alpha, levels, thresholds, signed: bool, n_uniform: int, lower_clip: bool):
    """The forward pass of :class:`_APoTFunction` before the rescaling by alpha: returns
    ``u = x / alpha`` and its level ``q`` (float32, signed for weights)."""
    u = x.float() / alpha.float()
    if signed:
        c = u.clamp(-1.0, 1.0)
    elif lower_clip:
        c = u.clamp(0.0, 1.0)  # ImageNet code: data.clamp(0, 1)
    else:
        c = u.clamp(max=1.0)  # CIFAR code: input.clamp(max=1)
    mag = c.abs() if signed else c
    if n_uniform:
        q = (mag * n_uniform).round() / n_uniform
    else:
        q = project(mag, levels, thresholds)
    if signed:
        q = q * c.sign()
    return u, q


def apot_grads(g, u, q, signed: bool, clip_x_grad: bool, lower_clip: bool, need_x: bool = True):
    """The official gradients of :class:`_APoTFunction` from ``u`` and ``q``
    (:func:`apot_project`): (dL/dx, dL/dalpha), both float32, before ``grad_scale``; dL/dx
    may be ``g`` itself (no clipping of the input's gradient), and is None unless
    ``need_x``."""
    g32 = g.float()
    if signed:
        outside = u.abs() > 1
        d_alpha = torch.where(outside, u.sign(), q - u)
    else:
        outside = u > 1
        d_alpha = torch.where(outside, torch.ones_like(u), q - u)
        if lower_clip:
            below = u < 0
            d_alpha = torch.where(below, torch.zeros_like(u), d_alpha)
            outside = outside | below
    g_x = None
    if need_x:
        g_x = g32.masked_fill(outside, 0.0) if (clip_x_grad or not signed) else g32
    return g_x, (g32 * d_alpha).sum()


class _APoTFunction(torch.autograd.Function):
    """``x_q = alpha * P(clip(x / alpha))`` with the official gradients (see the module doc).

    ``signed``: weights (sign-magnitude, clip to [-1, 1]); else activations (clip to
    ``(-inf, 1]`` or ``[0, 1]``, see ``lower_clip``).
    ``n_uniform`` > 0 rounds to ``k / n_uniform`` instead of projecting onto ``levels``.
    ``clip_x_grad``: block the input's gradient outside the clipping range (False: the
    calibrated gradient / the CIFAR code's weights). ``lower_clip``: for activations,
    whether values below 0 are clipped to 0, in the forward pass and the gradients
    (ImageNet code: ``clamp(0, 1)``), or not clipped at all (CIFAR code: ``_uq`` clamps with
    ``max=1`` only; a negative ``u`` is projected as it is -- onto level 0 for PoT/APoT,
    onto ``round(u n) / n < 0`` when uniform -- and its gradients are ``1`` for x and
    ``q - u`` for alpha, as ``_uq.backward``).
    """

    @staticmethod
    def forward(ctx, x, alpha, levels, thresholds, signed, n_uniform, clip_x_grad, lower_clip, grad_scale):
        dtype = x.dtype
        u, q = apot_project(x, alpha, levels, thresholds, signed, n_uniform, lower_clip)
        ctx.save_for_backward(u, q)
        ctx.cfg = (signed, clip_x_grad, lower_clip, grad_scale, dtype, alpha.dtype)
        return (q * alpha.float()).to(dtype)

    @staticmethod
    def backward(ctx, g):
        u, q = ctx.saved_tensors
        signed, clip_x_grad, lower_clip, grad_scale, dtype, adtype = ctx.cfg
        g_x, g_alpha = apot_grads(g, u, q, signed, clip_x_grad, lower_clip, ctx.needs_input_grad[0])
        if grad_scale:
            g_alpha = g_alpha * grad_scale
        g_x = g_x.to(dtype) if g_x is not None else None
        return g_x, g_alpha.to(adtype), None, None, None, None, None, None, None


def apot_quantize(
    x: torch.Tensor,
    alpha: torch.Tensor,
    levels: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    signed: bool,
    n_uniform: int = 0,
    clip_x_grad: bool = True,
    lower_clip: bool = True,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """Functional form of the quantizer (see :class:`_APoTFunction`)."""
    return _APoTFunction.apply(x, alpha, levels, thresholds, signed, n_uniform, clip_x_grad, lower_clip, grad_scale)


# --- quantizer modules --------------------------------------------------------------------


class APoTQuantizer(Quantizer):
    """One tensor's quantizer: a level table (buffer) and a learned clipping threshold
    ``alpha``. ``role="weight"``: weight normalisation, then sign-magnitude quantization
    with ``bits - 1`` magnitude bits; ``role="act"``: unsigned, ``bits`` bits."""

    def __init__(
        self,
        bits: int,
        role: Literal["weight", "act"],
        kind: LevelKind = "apot",
        variant: Literal["cifar", "imagenet"] = "cifar",
        alpha_init: float | None = None,
        grad_scale: float | None = None,
    ):
        super().__init__(bits)
        self.role = role
        self.kind = kind
        self.variant = variant
        self.grad_scale = grad_scale
        B = bits - 1 if role == "weight" else bits
        # 2-bit weights: {-1, 0, 1} with the calibrated gradient (both official codes)
        self.calibrated = role == "weight" and bits == 2
        self.n_uniform = 0
        if self.calibrated:
            self.n_uniform = 1
        elif kind == "uniform":
            self.n_uniform = 2**B - 1
        levels = level_set(kind, B) if not self.n_uniform else level_set("uniform", B)
        # non-persistent: they follow .to(device) but are a function of (kind, bits), so
        # checkpoints stay small and official state_dicts load
        self.register_buffer("levels", levels, persistent=False)
        tie_up = _tie_up(kind, B, levels) if not self.n_uniform else torch.zeros(len(levels) - 1, dtype=torch.bool)
        self.register_buffer("thresholds", decision_thresholds(levels, tie_up), persistent=False)
        w_init, a_init = ALPHA_INIT[variant]
        init = alpha_init if alpha_init is not None else (w_init if role == "weight" else a_init)
        self.alpha = nn.Parameter(torch.tensor(float(init)))
        self.initialized.fill_(True)  # constant initialisation, nothing to observe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantize = _fused.fused_apot if self.fused and _fused.supported(x) else apot_quantize
        if self.role == "weight":
            if self.variant == "cifar":
                mean, std = x.detach().mean(), x.detach().std()
            else:
                mean, std = x.mean(), x.std()
            x = (x - mean) / std
            return quantize(
                x,
                self.alpha,
                self.levels,
                self.thresholds,
                signed=True,
                n_uniform=self.n_uniform,
                clip_x_grad=not (self.calibrated or self.variant == "cifar"),
                grad_scale=self.grad_scale,
            )
        return quantize(
            x,
            self.alpha,
            self.levels,
            self.thresholds,
            signed=False,
            n_uniform=self.n_uniform,
            lower_clip=self.variant == "imagenet",
            grad_scale=self.grad_scale,
        )

    def max_levels(self) -> int:
        n = len(self.levels)
        return 2 * n - 1 if self.role == "weight" else n

    def scale_count(self) -> int:
        return 1  # alpha; the level table is fixed by (kind, bits)

    def extra_repr(self) -> str:
        kind = "uniform(calibrated)" if self.calibrated else self.kind
        return f"bits={self.bits}, role={self.role}, levels={kind}, variant={self.variant}"


class MaxScaled8bit(Quantizer):
    """The official first/last-layer weight quantizer: 8 bits scaled by the tensor's
    maximum, ``round(W / max(W) * 127) / 127 * max(W)``, straight-through gradient."""

    def __init__(self):
        super().__init__(8)
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = w.detach().max()
        wq = w.div(m).mul(127).round().div(127).mul(m)
        return (wq - w).detach() + w  # the official STE, float rounding included

    def max_levels(self) -> int:
        return 2**self.bits

    def scale_count(self) -> int:
        return 1  # max(W)


# --- the method ---------------------------------------------------------------------------


class APoTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: "apot" (additive powers of two), "pot" (powers of two) or "uniform" (power=False)
    levels: LevelKind = "apot"
    #: which official implementation's training details: "cifar" or "imagenet"
    variant: Literal["cifar", "imagenet"] = "cifar"
    #: multiply the clipping thresholds' gradients by this (ImageNet code's grad_scale)
    grad_scale: float | None = Field(default=None, gt=0)
    weight_alpha_init: float | None = Field(default=None, gt=0)
    act_alpha_init: float | None = Field(default=None, gt=0)
    #: "official": first conv and classifier at 8-bit max-scaled weights, inputs in FP;
    #: "fp": both entirely in full precision
    first_last: Literal["official", "fp"] = "official"
    #: learning rates / weight decay of the clipping thresholds (None: the variant's)
    act_alpha_lr: float | None = Field(default=None, gt=0)
    weight_alpha_lr: float | None = Field(default=None, gt=0)
    alpha_weight_decay: float | None = Field(default=None, ge=0)


class APoT(Method):
    name = "apot"
    paper = Paper(
        title=("Additive Powers-of-Two Quantization: An Efficient Non-uniform Discretization for Neural Networks"),
        authors="Li, Dong, Wang",
        venue="ICLR",
        year=2020,
        url="https://openreview.net/forum?id=BkgXT24tDS",
        code="https://github.com/yhhhli/APoT_Quantization",
    )
    comment = (
        "Official CIFAR/ImageNet quantizers (levels, weight normalisation, alpha gradients, "
        "calibrated 2-bit gradient, 8-bit max-scaled first/last weights). Level sets extended "
        "past the official 2..6 magnitude bits (1, 7, 8) by the same pattern; nearest level by "
        "one sorted search over precomputed float32 decision thresholds (bit-for-bit the "
        "official argmin, ties included), which also works in channels_last."
    )
    weight_bits = (*range(2, 9), 32)
    act_bits = (*range(2, 9), 32)
    Options = APoTOptions

    def _weight_q(self, bits: int) -> Quantizer:
        o = self.options
        return APoTQuantizer(bits, "weight", o.levels, o.variant, o.weight_alpha_init, o.grad_scale)

    def _act_q(self, bits: int) -> Quantizer:
        o = self.options
        return APoTQuantizer(bits, "act", o.levels, o.variant, o.act_alpha_init, o.grad_scale)

    def prepare(self, model: nn.Module, ctx: MethodContext | None = None) -> nn.Module:
        from .layers import first_last_layers
        from .modules import _wrap, set_submodule

        o = self.options
        policy = "fp" if o.first_last == "official" else o.first_last
        ends = first_last_layers(model)
        model = quantize_model(
            model,
            lambda m, n, b: self._weight_q(b),
            lambda m, n, b: self._act_q(b),
            self.w_bits,
            self.a_bits,
            first_last=policy,
            first_last_names=ends,
        )
        if o.first_last == "official":
            for name in ends:
                set_submodule(model, name, _wrap(model.get_submodule(name), MaxScaled8bit(), Identity()))
        return model

    def import_checkpoint(self, obj: dict, model: nn.Module, where: str | None = None) -> None:
        """Load an official APoT checkpoint into ``model`` (see :func:`import_checkpoint`)."""
        import_checkpoint(obj, model, where)

    def param_groups(self, model: nn.Module, recipe: Recipe) -> list[dict] | None:
        """As the official ``main.py``: every parameter (BatchNorm included) at the recipe's
        weight decay; the CIFAR variant gives the thresholds their own lr and decay."""
        o = self.options
        cifar = o.variant == "cifar"
        act_lr = o.act_alpha_lr or (CIFAR_ALPHA_GROUPS["act_lr"] if cifar else None)
        w_lr = o.weight_alpha_lr or (CIFAR_ALPHA_GROUPS["weight_lr"] if cifar else None)
        a_wd = o.alpha_weight_decay
        if a_wd is None:
            a_wd = CIFAR_ALPHA_GROUPS["weight_decay"] if cifar else recipe.weight_decay
        acts, weights, rest = [], [], []
        for m in model.modules():
            for p in m.parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if isinstance(m, APoTQuantizer):
                    (weights if m.role == "weight" else acts).append(p)
                else:
                    rest.append(p)
        groups = [{"params": rest, "weight_decay": recipe.weight_decay}]
        for params, lr in ((acts, act_lr), (weights, w_lr)):
            if params:
                g = {"params": params, "weight_decay": a_wd}
                if lr is not None:
                    g["lr"] = lr
                groups.append(g)
        return groups


# --- importing the official checkpoints ---------------------------------------------------


def official_to_qbench(state: dict) -> dict:
    """Map an official APoT state_dict (``module.``-prefixed, ``X.act_alpha``,
    ``X.weight_quant.wgt_alpha`` or ImageNet's ``X.weight_alpha``) to qbench names."""
    out = {}
    for key, value in state.items():
        k = key.removeprefix("module.")
        if k.endswith(".act_alpha"):
            k = k[: -len("act_alpha")] + "act_quantizer.alpha"
        elif k.endswith(".weight_quant.wgt_alpha"):
            k = k[: -len("weight_quant.wgt_alpha")] + "weight_quantizer.alpha"
        elif k.endswith(".weight_alpha"):
            k = k[: -len("weight_alpha")] + "weight_quantizer.alpha"
        out[k] = value
    return out


def import_checkpoint(obj: dict, model: nn.Module, where: str | Path | None = None) -> None:
    """Load an official APoT checkpoint (the dict ``torch.save``'d by its ``main.py``, or
    its bare state_dict) into ``model`` prepared by :class:`APoT` with matching bits."""
    from .errors import QbenchError

    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QbenchError(
            "not an APoT checkpoint: expected a dict with a 'state_dict' of tensors",
            str(where) if where else None,
        )
    mapped = official_to_qbench(state)
    own = model.state_dict()
    # qbench's own bookkeeping (the quantizers' ``initialized`` flags) is not in the file
    missing = [k for k in own if k not in mapped and not k.endswith(".initialized")]
    unexpected = [k for k in mapped if k not in own]
    if missing or unexpected:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") if keys else "none"

        raise QbenchError(
            f"checkpoint does not fit the model: missing {few(missing)}; unexpected "
            f"{few(unexpected)} (wrong model or bits?)",
            str(where) if where else None,
        )
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise QbenchError(f"shape mismatch for {bad[:4]} (wrong model?)", str(where) if where else None)
    model.load_state_dict(mapped, strict=False)


class APoTUniformOptions(APoTOptions):
    levels: Literal["uniform"] = "uniform"


class APoTUniform(APoT):
    """APoT's training (weight normalisation, learned clipping thresholds, calibrated 2-bit
    gradient) with the uniform quantizer: the official ``power=False`` setting of the
    README's "Compared with Uniform Quantization" table, registered apart so that its
    reported numbers do not meet APoT's."""

    name = "apot_uniform"
    comment = "APoT with power=False (uniform levels); " + APoT.comment
    Options = APoTUniformOptions
    #: 2: CIFAR variant, activations clipped from above only (the official ``clamp(max=1)``):
    #: a negative input rounds to a negative level, with the official alpha gradient.
    #: (``apot`` itself is unchanged: on its PoT/APoT levels a negative input projects onto
    #: 0 with the same gradients either way.)
    version = 2
