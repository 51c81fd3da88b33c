r"""Bayesian Bits: learned mixed precision and pruning through gated residual quantization.

van Baalen, Louizos, Nagel, Amjad, Wang, Blankevoort, Welling. "Bayesian Bits: Unifying
Quantization and Pruning", NeurIPS 2020. https://arxiv.org/abs/2005.07093; official code:
https://github.com/Qualcomm-AI-research/BayesianBits (the rules below follow it; file and
function names in brackets).

**Decomposition** (``recursive_quantization``, ``BayesianBitsQuantizer.get_scales``).
A tensor is clipped to its learned range and quantized at 2 bits, then the residual error
is quantized at 4, 8, 16 and 32 bits, each on a grid that splits the previous step:

.. math::
    s_2 = \frac{\alpha - \alpha_{min}}{2^2 - 1}, \qquad s_{2b} = \frac{s_b}{2^b + 1}

    x_2 = s_2 \lfloor x / s_2 \rceil, \quad
    x_{4} = s_{4} \lfloor (x - x_2) / s_{4} \rceil, \quad
    x_{8} = s_{8} \lfloor (x - x_2 - x_4) / s_{8} \rceil, \ \dots

    \hat x = z_2 \big(x_2 + z_4 (x_4 + z_8 (x_8 + z_{16} (x_{16} + z_{32} x_{32})))\big)

so a gate only matters when every lower gate is on, and the effective width is
:math:`2^{1 + z_4 + z_4 z_8 + z_4 z_8 z_{16} + z_4 z_8 z_{16} z_{32}}` (``get_bw``). Range
(``--learned-scale=range``, ``pact_clip``): :math:`\alpha` (``x_max``) is learned; the
tensor is clipped to :math:`[-\alpha', \alpha']` when its first batch had negative values
(signed), else to :math:`[0, \alpha']`, :math:`\alpha' = (1 - 10^{-7})\alpha`, and
:math:`\alpha_{min} = -\alpha` or 0. :math:`\alpha` starts at the maximum of the tensor (the
weights, or the first activation batch: ``get_x_min_x_max``/``init_xminmax``); a signed
tensor therefore keeps :math:`2^b - 1` levels, an unsigned one :math:`2^b`. Rounding is
straight-through (identity gradient) in training, plain rounding at test time.

**Gates** (``l0_sample``, ``get_gates``). Hard-concrete (L0) gates, one sample per forward
pass, :math:`\beta = 2/3, \zeta = 1.1, \gamma = -0.1`:

.. math::
    z = \min(1, \max(0, \sigma((\log u - \log(1-u) + \log\alpha_g)/\beta)(\zeta - \gamma) + \gamma)),
    \quad u \sim U(0, 1)

A gate whose :math:`\log\alpha_g \le -2` is 0 (and so are all higher ones). At test time a
gate is on iff :math:`P(z = 0) = \sigma(\beta\log(-\gamma/\zeta) - \log\alpha_g) < 0.34`
(``hc_thres``). :math:`z_4..z_{32}` are one gate per tensor; :math:`z_2` (pruning,
``include_pruning``) is one gate per output channel of a weight tensor (``gamma_2`` of size
``x.size(0)``, initialised at 6); activations have no pruning gate.
``gating_method="fixed"`` uses the deterministic hard sigmoid in training instead.

**Regulariser** (``BayesianBitsQuantizer.regularizer``, ``assign_macs``, ``gate_loss``).
With :math:`q_b = P(z_b \ne 0) = \sigma(\log\alpha_b - \beta\log(-\gamma/\zeta))` and, for
``reg_type="bop"``, :math:`B(b) = b \cdot \mathrm{MACs}/\max_\ell \mathrm{MACs}` (the MACs of
the layer that reads the tensor, over the largest layer's; ``"const"``: :math:`B = 1`),
each quantizer adds

.. math::
    R = \frac{1}{C}\sum_c q_{2,c}\big(B(2) + q_4 B(4) + q_4 q_8 B(8) + q_4 q_8 q_{16} B(16)
        + q_4 q_8 q_{16} q_{32} B(32)\big)

(weights with pruning gates, :math:`C` output channels); without pruning gates the first
term is the constant 1 instead of :math:`q_2 B(2)`. The loss is
:math:`\mathrm{CE} + \mu \sum R` (``gating_lambda``), added by :meth:`BayesianBits.extra_loss`.

**First/last layers** (``models/mnist_models.py``, ``cifar_models.py``,
``set_full_precision_logits``): every layer's weights carry Bayesian Bits gates; the last
layer's weights have no pruning gates and its output (the logits) stays in full precision;
every other layer's output activation is gated (here: the next layer's input). The image
is not quantized by the official code but counted at 8 bits in its BOPs ("input has 8bit
color values"); here the first layer's input gets a fixed 8-bit quantizer on the same grid
(``first_input_bits``; 32 leaves it full precision, as the official forward pass does).

**Optimisers** (``get_optimizers``): weights, gates (``log_alpha``) and ranges (``x_max``)
are three groups: the recipe's learning rate for weights, ``lr_q`` for gates, ``lr_s`` for
ranges, no weight decay on gates and ranges (the papers' MNIST/CIFAR commands: Adam, 1e-3
each, no weight decay; set ``optimizer: adam, weight_decay: 0`` in the recipe). The
official MNIST/CIFAR-10 schedule (``make_lr_scheduler``) holds the weights' rate for two
thirds of the epochs, then decays it linearly to zero, and leaves gates and ranges at
theirs: ``schedule: hold_linear`` with ``schedule_quantizer_lr: false``.

**Fixed-gate fine-tuning** (``--fixed-gate-finetune-epochs``, ``replace_bb_quantizers``,
``get_finetune_optimizers``): after the main training the gates are frozen at their
test-time decision and each quantizer becomes :math:`s_b \lfloor \mathrm{clip}(x)/s_b \rceil`
times the channel mask, its range still learned; weights at ``finetune_lr`` (official 1e-4),
ranges at ``finetune_lr_s`` (1e-4), no regulariser.

**BatchNorm folding** (``BatchNormQScheme``, ``quantized_folded_bn.py``; option ``fold_bn``,
default on). Each Conv2d/Linear whose output goes only to a BatchNorm (found in the
``torch.fx`` graph: sequential conv-BN pairs, ResNet ``conv1/bn1``, ``conv2/bn2``,
``downsample.0/1``, a pre-activation block's ``conv1/bn2``) becomes one
:class:`FoldedQuantConv2d`/:class:`FoldedQuantLinear` that owns the BN module (the model's
slot for it holds an ``nn.Identity``; parameters and running statistics are the parent's).
The weight quantizer reads the folded weight :math:`W_f = W\gamma/\sigma`,
:math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`; in training the batch statistics
:math:`\mu_B, \sigma_B` (biased variance) come from the full-precision, unfolded, ungated
output :math:`y = Wx + b` of the same quantized input, the output is
:math:`z \odot (Q(W_f)x\,\sigma/\sigma_B + \beta - \gamma(\mu_B - b)/\sigma_B)` and the running
mean and unbiased variance move by the BN's momentum; at test time (and in fine-tuning) it is
:math:`z \odot (Q(W_f)x + \beta + \gamma(b - \mu)/\sigma)`. A pruning gate :math:`z` thus scales
the normalised output and gets its gradient from the task loss; with the BN applied after a
gated layer, training-mode BN would divide the gate's scale out. The deployed weight is
:math:`Q(W_f)` (the bit audit counts its values); the BN parameters and statistics are stored
at 32 bits as before (the folded shift is computed from them).

**Variants**: ``include_pruning=False`` is quantization only. ``prune_only`` (needs
``include_pruning``) learns only the pruning gates of full-precision weights, with
activations in full precision; ``fixed_8bit`` / ``fixed_48bit`` with ``prune_only`` quantize
weights at 8 / 4 bits and activations at 8 (the official w8a8 / w4a8 pruning-only results).
The last layer's weights stay learned Bayesian Bits (or the fixed width), never pruned, as
the official ResNet does (its LeNet/VGG paths reject ``prune_only``).

**Bits in qbench**: the learned widths are the result, so the cell's bits are ``W32A32``
("learned, up to 32"); ``W8A8`` and ``W4A8`` name the fixed pruning-only variants (they imply
``prune_only`` and ``fixed_8bit`` / ``fixed_48bit``). :meth:`BayesianBits.finalize` freezes the
gates; each quantizer then reports its learned width (0: every channel pruned) through
``bits``, which is what :func:`qbench.methods.footprint.footprint` reads.

**Deviations** (also in :attr:`BayesianBits.comment`):

* activations are quantized at each layer's input (qbench's wrapper), not at the previous
  layer's output: the same after ReLU and max pooling, but after average pooling (a
  ResNet's classifier) and where one output feeds two layers (a projection shortcut: two
  quantizers, each with its own layer's MACs, where the official code has one with both);
* a pruned output channel of a folded layer is 0 after its BatchNorm (the gate multiplies
  the folded shift too); the official code gates only :math:`Q(W_f)`, so a pruned channel
  still carries the constant :math:`\beta - \gamma\mu/\sigma` that a deployment would fold
  into the next layer. Here pruned means removed, as the footprint counts it;
* fine-tuning keeps :math:`W`, :math:`\gamma`, :math:`\beta` as parameters with the BatchNorm
  at its running statistics (official: ``static_fold_bn`` turns them into one folded weight
  and bias): the same function, another parametrisation;
* the pairs are found in the ``torch.fx`` graph (any model that traces); a model that does not
  trace falls back to one forward pass with hooks, which cannot see a conv output also read
  by a plain function (``bn(y) + y``);
* an activation's range starts at the first calibration batch's maximum, computed with the
  model in training mode (BatchNorm batch statistics, as the official first forward pass;
  quantizers at their deterministic test-time gates) (official: the first 2 images of the
  first training batch);
* the first layer's input is quantized at 8 bits (``first_input_bits``, see above);
* the harness has one optimizer type for all groups: ImageNet's SGD-for-weights /
  Adam-for-gates split needs one optimizer for all; the fine-tuning stage uses the
  recipe's optimizer and a cosine schedule;
* the logged relative BOPs count output-channel pruning only (the official
  ``get_keep_ratio_and_prune_prob`` also discounts input channels pruned in the previous
  layer of LeNet/VGG);
* quantization is computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .base import Method, MethodContext, Paper, calib_example
from .errors import QbenchError
from .footprint import count_macs
from .layers import first_last_layers
from .modules import Identity, QuantConv2d, Quantizer, QuantLinear, quant_layers, quantize_model, set_submodule
from .recipe import Recipe

#: hard-concrete stretch and temperature (``hc_beta``, ``hc_zeta``, ``hc_gamma``)
BETA, ZETA, GAMMA = 2.0 / 3.0, 1.1, -0.1
#: a gate is on at test time iff P(z = 0) < THRESHOLD (``hc_thres``)
THRESHOLD = 0.34
#: a gate whose log-alpha is at or below this is off, and so are the higher ones
HARD_OFF = -2.0
#: the widths the residuals add, in order
RESIDUAL_BITS = (4, 8, 16, 32)
#: log P(z = 0) offset: beta * log(-gamma / zeta)
_OFFSET = BETA * math.log(-GAMMA / ZETA)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with the straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def bb_scales(s2: torch.Tensor) -> list[torch.Tensor]:
    """``[s_2, s_4, s_8, s_16, s_32]`` with ``s_2b = s_b / (2^b + 1)``."""
    scales = [s2]
    for b in (2, 4, 8, 16):
        scales.append(scales[-1] / (2**b + 1))
    return scales


def width_index(bits: int) -> int:
    """Index of ``bits`` in ``[2, 4, 8, 16, 32]``."""
    return int(round(math.log2(bits))) - 1


def bb_clip(x: torch.Tensor, x_max: torch.Tensor, signed: bool) -> torch.Tensor:
    """Clip to ``[-a, a]`` (signed) or ``[0, a]``, ``a = (1 - 1e-7) x_max``, written as the
    official ``pact_clip`` so the gradient reaches ``x_max`` the same way."""
    hi = (1 - 1e-7) * x_max
    lo = -hi if signed else torch.zeros_like(hi)
    return hi - F.relu(hi - lo - F.relu(x - lo))


def base_step(x_max: torch.Tensor, signed: bool) -> torch.Tensor:
    """``s_2 = (x_max - x_min) / 3`` with ``x_min = -x_max`` (signed) or 0."""
    return (2 * x_max if signed else x_max) / 3


def bb_quantize(x: torch.Tensor, s2: torch.Tensor, gates: torch.Tensor, round_fn=round_ste) -> torch.Tensor:
    """The gated residual decomposition of ``x`` (already clipped): 2 bits, plus the
    4/8/16/32-bit residuals nested behind ``gates`` = ``[z_4, z_8, z_16, z_32]``."""
    scales = bb_scales(s2)
    x2 = scales[0] * round_fn(x / scales[0])
    residual = x - x2
    terms = []
    for s in scales[1:]:
        t = s * round_fn(residual / s)
        terms.append(t)
        residual = residual - t
    acc = gates[3] * terms[3]
    for k in (2, 1, 0):
        acc = gates[k] * (terms[k] + acc)
    return x2 + acc


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A hard-concrete sample for uniform noise ``u`` (``l0_sample``)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def hard_sigmoid(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic stretched sigmoid of ``gating_method='fixed'`` (``hardsigmoid``)."""
    return torch.clamp(torch.sigmoid(log_alpha / BETA) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """``q = P(z != 0) = sigmoid(log_alpha - beta log(-gamma/zeta))`` (``hc_prob_pos``)."""
    return torch.sigmoid(log_alpha - _OFFSET)


def test_time_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """1 where ``P(z = 0) < 0.34``, else 0 (the official test-time decision)."""
    return (torch.sigmoid(_OFFSET - log_alpha) < THRESHOLD).float()


def chain_bits(gates: torch.Tensor) -> int:
    """Width of a tensor from its 0/1 gates ``[z_4, z_8, z_16, z_32]`` (``get_bw``)."""
    n, on = 1, 1
    for g in gates.tolist():
        on *= int(g > 0)
        n += on
    return 2**n


class BayesianBitsQuantizer(Quantizer):
    """One tensor's Bayesian Bits quantizer: learned range ``x_max``, residual gates
    ``log_alpha = [log a_4, log a_8, log a_16, log a_32]`` and, with ``channels``, one
    pruning gate per output channel (``log_alpha_2``).

    ``fixed_bits`` (8 or 4) quantizes at that width instead of the gated decomposition
    (the pruning-only variants); ``prune_only`` without it leaves values in full precision
    and only prunes. ``regularize=False`` keeps it out of the regulariser (the 8-bit image
    quantizer). After :meth:`freeze` the gates are the test-time decision and the output
    is ``s_b round(clip(x)/s_b)`` times the channel mask (the fine-tuning/deployment form);
    ``bits`` reports the learned width (0: every channel pruned) from then on and, before,
    the width the test-time decision would choose.
    """

    def __init__(
        self,
        *,
        weight: bool,
        log_alpha_init: tuple[float, float, float, float] = (6.0, 6.0, 6.0, 6.0),
        channels: int | None = None,
        log_alpha_2_init: float = 6.0,
        fixed_bits: int | None = None,
        prune_only: bool = False,
        gating: str = "l0",
        reg_type: str = "bop",
        regularize: bool = True,
    ):
        super().__init__(32)
        if prune_only and channels is None:
            raise ValueError("prune_only needs pruning gates (channels)")
        self.weight = weight
        self.fixed_bits = fixed_bits
        self.prune_only = prune_only
        self.gating = gating
        self.reg_type = reg_type
        self.regularize = regularize
        self.x_max = nn.Parameter(torch.ones(()))
        self.log_alpha = nn.Parameter(torch.tensor([float(v) for v in log_alpha_init]))
        self.log_alpha_2 = nn.Parameter(torch.full((channels,), float(log_alpha_2_init))) if channels else None
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        # MACs of the reading layer over the largest layer's; < 0: unknown (B(b) = 1)
        self.register_buffer("mac_ratio", torch.full((), -1.0))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen_bits", torch.full((), 32, dtype=torch.long))
        if channels:
            self.register_buffer("keep", torch.ones(channels))
        self._mirror: dict[str, object] = {}

    # -- state: buffers are the truth; Python mirrors spare a host read every step -------
    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._mirror.clear()
        self._refresh_mirror()

    def _refresh_mirror(self) -> None:
        """Read every mirrored buffer now (once, at load time), not in the next forward
        pass, where the read would be a host sync and, under ``torch.compile``, a graph
        break (a resumed compiled cell otherwise fell back to eager layer by layer)."""
        self.is_signed(), self.is_frozen(), self._mac_ratio(), self._frozen_bits()

    def _read(self, key: str, fn):
        if key not in self._mirror:
            self._mirror[key] = fn()
        return self._mirror[key]

    def is_signed(self) -> bool:
        return self._read("signed", lambda: bool(self.signed))

    def is_frozen(self) -> bool:
        return self._read("frozen", lambda: bool(self.frozen))

    def _mac_ratio(self) -> float:
        return self._read("mac_ratio", lambda: float(self.mac_ratio))

    def _frozen_bits(self) -> int:
        return self._read("frozen_bits", lambda: int(self.frozen_bits))

    def set_mac_ratio(self, ratio: float) -> None:
        self.mac_ratio.fill_(float(ratio))
        self._mirror.pop("mac_ratio", None)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor) -> None:
        """``x_max = max(max(x), 0)``, signed iff ``min(x) < 0`` (``init_xminmax``)."""
        x = x.detach().float()
        self.x_max.copy_(x.max().clamp_min(0.0).clamp_min(1e-8))
        self.signed.fill_(bool(x.min() < 0))
        self._mirror.pop("signed", None)
        self.mark_initialized()

    @property
    def bits(self) -> int:  # type: ignore[override]
        if "log_alpha" not in self._parameters:  # during Quantizer.__init__
            return self.__dict__.get("_nominal_bits", 32)
        return self.decided_bits()

    @bits.setter
    def bits(self, value: int) -> None:
        self.__dict__["_nominal_bits"] = int(value)

    def extra_repr(self) -> str:
        return f"fixed_bits={self.fixed_bits}, prune_only={self.prune_only}, pruning={self.log_alpha_2 is not None}"

    # -- gates --------------------------------------------------------------------------
    def _gate(self, log_alpha: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return test_time_gate(log_alpha)
        if self.gating == "fixed":
            return hard_sigmoid(log_alpha)
        u = torch.rand(log_alpha.shape, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
        return hard_concrete_sample(log_alpha, u)

    def residual_gates(self) -> torch.Tensor:
        """``[z_4, z_8, z_16, z_32]``: sampled (training) or decided (test), 0 where
        ``log_alpha <= -2``."""
        g = self._gate(self.log_alpha)
        return torch.where(self.log_alpha > HARD_OFF, g, torch.zeros_like(g))

    def pruning_gate(self) -> torch.Tensor | None:
        return None if self.log_alpha_2 is None else self._gate(self.log_alpha_2)

    @torch.no_grad()
    def decided_bits(self) -> int:
        """The width the test-time decision gives (0 when every channel is pruned)."""
        if self.is_frozen():
            return self._frozen_bits()
        if self.log_alpha_2 is not None and not bool((test_time_gate(self.log_alpha_2) > 0).any()):
            return 0
        if self.fixed_bits is not None:
            return self.fixed_bits
        if self.prune_only:
            return 32
        la = self.log_alpha.detach()
        return chain_bits(torch.where(la > HARD_OFF, test_time_gate(la), torch.zeros_like(la)))

    @torch.no_grad()
    def keep_ratio(self) -> float:
        """Fraction of output channels the test-time decision keeps (1 without pruning)."""
        if self.log_alpha_2 is None:
            return 1.0
        keep = self.keep if self.is_frozen() else test_time_gate(self.log_alpha_2)
        return float(keep.mean())

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the gates at their test-time decision (``replace_bb_quantizers``)."""
        if self.log_alpha_2 is not None:
            self.keep.copy_(test_time_gate(self.log_alpha_2))
        self.frozen_bits.fill_(self.decided_bits())
        self.frozen.fill_(True)
        self._mirror.clear()
        self.log_alpha.requires_grad_(False)
        if self.log_alpha_2 is not None:
            self.log_alpha_2.requires_grad_(False)

    # -- forward ------------------------------------------------------------------------
    def _mask(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        if gate is None:
            return x
        return x * gate.view(-1, *([1] * (x.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gate(x)[0]

    def forward_with_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The quantized tensor and the per-output-channel pruning gate this call applied
        (the sample in training, the decision at test time, the mask once frozen; None
        without pruning gates): a folded BatchNorm gates its shift with the same values."""
        if self.should_observe() and not self.is_initialized():
            self.init_range(x)
        xf = x.float()
        round_fn = round_ste if self.training else torch.round
        if self.is_frozen():
            out, gate = self._frozen_forward(xf, round_fn)
        elif self.prune_only and self.fixed_bits is None:
            gate = self.pruning_gate()
            out = self._mask(xf, gate)
        else:
            signed = self.is_signed()
            xc = bb_clip(xf, self.x_max, signed)
            s2 = base_step(self.x_max, signed)
            if self.fixed_bits is not None:
                s = bb_scales(s2)[width_index(self.fixed_bits)]
                out = s * round_fn(xc / s)
            else:
                out = bb_quantize(xc, s2, self.residual_gates(), round_fn)
            gate = self.pruning_gate()
            out = self._mask(out, gate)
        return out.to(x.dtype), gate

    def _frozen_forward(self, xf: torch.Tensor, round_fn) -> tuple[torch.Tensor, torch.Tensor | None]:
        keep = self.keep if self.log_alpha_2 is not None else None
        bits = self._frozen_bits()
        if bits == 0:  # every output channel pruned
            return torch.zeros_like(xf), torch.zeros(xf.shape[0], device=xf.device)
        if self.prune_only and self.fixed_bits is None:
            return self._mask(xf, keep), keep
        signed = self.is_signed()
        s = bb_scales(base_step(self.x_max, signed))[width_index(bits)]
        return self._mask(s * round_fn(bb_clip(xf, self.x_max, signed) / s), keep), keep

    # -- regulariser --------------------------------------------------------------------
    def _bop(self, b: int) -> float | torch.Tensor:
        if self.reg_type == "const" or self._mac_ratio() < 0:
            return 1.0
        return self._mac_ratio() * b

    def regularizer(self) -> torch.Tensor:
        """The official prior term for this tensor (see the module docstring)."""
        q = prob_nonzero(self.log_alpha)
        chain, prod = 0.0, 1.0
        for k, b in enumerate(RESIDUAL_BITS):
            prod = prod * q[k]
            chain = chain + prod * self._bop(b)
        if self.log_alpha_2 is None:
            return 1.0 + chain
        q2 = prob_nonzero(self.log_alpha_2)
        return (q2 * (self._bop(2) + chain)).mean()

    # -- what is stored -----------------------------------------------------------------
    def scale_count(self) -> int:
        """After :meth:`freeze`: the range ``x_max`` (the width and channel mask are
        integers); before, every float of the state."""
        if self.is_frozen():
            return 0 if (self.prune_only and self.fixed_bits is None) else 1
        return super().scale_count()


def bb_quantizers(model: nn.Module) -> list[tuple[str, BayesianBitsQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BayesianBitsQuantizer)]


# -- BatchNorm folded into the layer (``BatchNormQScheme``) -----------------------------------
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """A Conv2d followed by a BatchNorm2d, or a Linear by a BatchNorm1d, of its width, with
    running statistics (a BN without them normalises with batch statistics at test time too)."""
    if isinstance(layer, nn.Conv2d):
        ok, width = type(bn) is nn.BatchNorm2d, layer.out_channels
    elif isinstance(layer, nn.Linear):
        ok, width = type(bn) is nn.BatchNorm1d, layer.out_features
    else:
        return False
    return ok and bn.num_features == width and bn.track_running_stats and bn.running_mean is not None


def conv_bn_pairs(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, str]]:
    """``(layer, bn)`` module names where a Conv2d/Linear's output goes to a BatchNorm and
    nowhere else, each module called once: from the ``torch.fx`` graph; where the model does
    not trace, from one forward pass of ``example`` (the BN's input is the very tensor the
    layer returned, and no other module reads it; a read by a plain function is not seen)."""
    mods = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        return [] if example is None else _pairs_by_hooks(model, example)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BN) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[src.target] == calls[node.target] == 1 and _foldable(mods[src.target], mods[node.target]):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_by_hooks(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (layer, its output), kept alive
    readers: dict[str, list[str]] = {}
    calls: dict[str, int] = {}
    hooks = []

    def pre(name):
        def fn(mod, args):
            calls[name] = calls.get(name, 0) + 1
            for a in args:
                hit = outputs.get(id(a))
                if hit is not None and hit[1] is a:
                    readers.setdefault(hit[0], []).append(name)

        return fn

    def post(name):
        def fn(mod, args, out):
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out)

        return fn

    for name, mod in model.named_modules():
        if name and not list(mod.children()):  # leaf modules read and write the tensors
            hooks.append(mod.register_forward_pre_hook(pre(name)))
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                hooks.append(mod.register_forward_hook(post(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    mods = dict(model.named_modules())
    return [
        (layer, r[0])
        for layer, r in readers.items()
        if len(r) == 1 and calls[layer] == calls[r[0]] == 1 and _foldable(mods[layer], mods[r[0]])
    ]


class _FoldedBN:
    r"""A quantized Conv2d/Linear with the BatchNorm that follows it folded in, as the official
    ``BatchNormQScheme``: the weight quantizer sees the folded weight
    :math:`W_f = W \gamma / \sigma` (:math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`),
    and

    * training: the batch statistics :math:`\mu_B, \sigma_B^2` (biased) come from the
      full-precision, unfolded, ungated output :math:`y = W x (+ b)` of the same (quantized)
      input, and :math:`\mathrm{out} = Q(W_f) x \cdot \sigma / \sigma_B + \beta - \gamma
      (\mu_B - b) / \sigma_B`; the running mean and the unbiased variance move by the BN's
      momentum (``adjust_output``, ``get_batch_stats``, ``update_running_avgs``);
    * test time, and after :meth:`freeze_bn` (the fine-tuning stage, the official
      ``static_fold_bn``): :math:`\mathrm{out} = Q(W_f) x + \beta + \gamma (b - \mu) / \sigma`
      with the running statistics.

    A pruning gate multiplies the whole output channel, the shift included (official: only
    :math:`Q(W_f)`), so a pruned channel is 0 after the BatchNorm too. The BatchNorm module
    is this layer's child ``bn`` (its parameters and statistics are kept; the model's own
    slot for it holds an ``nn.Identity``). With every gate on at 32 bits it computes
    conv/linear followed by the BatchNorm.
    """

    bn: nn.Module

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, w, b)
        return F.linear(x, w, b)

    def _bn_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``gamma``, ``beta`` and the running ``sigma`` (float32)."""
        bn = self.bn
        sigma = torch.sqrt(bn.running_var.float() + bn.eps)
        if bn.affine:
            return bn.weight.float(), bn.bias.float(), sigma
        return torch.ones_like(sigma), torch.zeros_like(sigma), sigma

    def _folded(self, gamma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.weight * (gamma / sigma).to(self.weight.dtype).view(-1, *([1] * (self.weight.dim() - 1)))

    def weight_to_quantize(self) -> torch.Tensor:
        """The folded weight ``W gamma / sigma`` the weight quantizer reads (the deployed
        weight is its quantized value)."""
        gamma, _, sigma = self._bn_terms()
        return self._folded(gamma, sigma)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight_to_quantize())

    def bn_frozen(self) -> bool:
        if not hasattr(self, "_bn_frozen_known"):
            self._bn_frozen_known = bool(self.bn_frozen_flag)
        return self._bn_frozen_known

    @torch.no_grad()
    def freeze_bn(self) -> None:
        """Normalise with the running statistics from now on, in training too, and stop
        updating them (the official fine-tuning stage folds BN statically)."""
        self.bn_frozen_flag.fill_(True)
        self._bn_frozen_known = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._bn_frozen_known = bool(self.bn_frozen_flag)  # read at load time, not in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_quantizer(x)
        gamma, beta, sigma = self._bn_terms()
        w = self._folded(gamma, sigma)
        wq = self.weight_quantizer
        if hasattr(wq, "forward_with_gate"):
            w, gate = wq.forward_with_gate(w)
        else:
            w, gate = wq(w), None
        out = self._op(x, w)
        b = self.bias.float() if self.bias is not None else torch.zeros_like(sigma)
        shape = (-1,) + (1,) * (out.dim() - 2)
        if self.training and not self.bn_frozen():
            y = self._op(x, self.weight, self.bias).float()  # full precision, unfolded, ungated
            dims = [0, *range(2, y.dim())]
            var, mean = torch.var_mean(y, dim=dims, unbiased=False)
            sigma_b = torch.sqrt(var + self.bn.eps)
            scale = (sigma / sigma_b).view(shape)
            shift = beta - gamma * (mean - b) / sigma_b
            self._update_running(mean.detach(), var.detach(), y.numel() // y.shape[1])
        else:
            scale = None
            shift = beta + gamma * (b - self.bn.running_mean.float()) / sigma
        if gate is not None:
            shift = shift * gate.to(shift.dtype)
        res = out.float() if scale is None else out.float() * scale
        return (res + shift.view(shape)).to(out.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        bn = self.bn
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm
            momentum = 1.0 / float(bn.num_batches_tracked)
        unbiased = var * (n / max(n - 1, 1))
        bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)


class FoldedQuantConv2d(_FoldedBN, QuantConv2d):
    """Quantized Conv2d with its BatchNorm2d folded in (see :class:`_FoldedBN`)."""


class FoldedQuantLinear(_FoldedBN, QuantLinear):
    """Quantized Linear with its BatchNorm1d folded in (see :class:`_FoldedBN`)."""


def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """The folded form of a quantized layer (sharing its parameters and quantizers) that
    owns ``bn``."""
    cls = FoldedQuantConv2d if isinstance(layer, QuantConv2d) else FoldedQuantLinear
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new._modules = dict(layer._modules)
    new._buffers = dict(layer._buffers)
    new.bn = bn
    new.register_buffer("bn_frozen_flag", torch.zeros((), dtype=torch.bool, device=bn.running_var.device))
    return new


def folded_layers(model: nn.Module) -> list[tuple[str, _FoldedBN]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _FoldedBN)]


class BayesianBitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: mu, the regulariser's strength (official ``--gating-lambda``; CIFAR 0.01/0.1, MNIST 0.1)
    gating_lambda: float = Field(0.01, ge=0.0)
    reg_type: Literal["bop", "const"] = "bop"
    gating_method: Literal["l0", "fixed"] = "l0"
    #: initial log-alpha of the pruning gates (hard-coded 6 in the official code)
    gamma_2_init: float = 6.0
    gamma_4_init: float = 6.0
    gamma_8_init: float = 6.0
    gamma_16_init: float = 6.0
    gamma_32_init: float = 6.0
    include_pruning: bool = True
    prune_only: bool = False
    fixed_8bit: bool = False
    fixed_48bit: bool = False
    lr_q: float = Field(1e-3, gt=0.0)
    lr_s: float = Field(1e-3, gt=0.0)
    #: false: the recipe's schedule moves the weights' learning rate only, gates and ranges
    #: keep ``lr_q`` / ``lr_s`` (the official MNIST/CIFAR-10 runs schedule only the weights'
    #: optimizer; its ImageNet multistep schedule moves all three)
    schedule_quantizer_lr: bool = True
    fixed_gate_finetune_epochs: int = Field(0, ge=0, le=10_000)
    finetune_lr: float = Field(1e-4, gt=0.0)
    finetune_lr_s: float = Field(1e-4, gt=0.0)
    first_input_bits: Literal[8, 32] = 8
    #: fold each BatchNorm into the conv/linear layer before it (official ``BatchNormQScheme``)
    fold_bn: bool = True

    @model_validator(mode="after")
    def _variants(self):
        if self.fixed_8bit and self.fixed_48bit:
            raise ValueError("fixed_8bit and fixed_48bit exclude each other")
        if self.prune_only and not self.include_pruning:
            raise ValueError("prune_only needs include_pruning: true")
        if (self.fixed_8bit or self.fixed_48bit) and not self.prune_only:
            raise ValueError("fixed_8bit / fixed_48bit are pruning-only variants: set prune_only: true")
        return self


class BayesianBits(Method):
    name = "bayesian_bits"
    paper = Paper(
        title="Bayesian Bits: Unifying Quantization and Pruning",
        authors="van Baalen, Louizos, Nagel, Amjad, Wang, Blankevoort, Welling",
        venue="NeurIPS",
        year=2020,
        url="https://arxiv.org/abs/2005.07093",
        code="https://github.com/Qualcomm-AI-research/BayesianBits",
    )
    comment = (
        "W32A32 = widths learned up to 32 (W8A8/W4A8: pruning-only fixed variants); activations "
        "quantized at each layer's input (one quantizer per reading layer); BN folded into the "
        "preceding conv as the official BatchNormQScheme, a pruned channel's BN shift gated too; image "
        "quantized at 8 bits (official: unquantized, counted at 8); one optimizer type for "
        "weights, gates and ranges (ImageNet paper: SGD weights, Adam gates); activation range from the "
        "first calibration batch (BN batch statistics); logged "
        "relative BOPs count output-channel pruning only"
    )
    status = "follows the official code"
    #: 2: BatchNorm folded into the preceding conv/linear (``BatchNormQScheme``)
    version = 2
    weight_bits = (4, 8, 32)
    act_bits = (8, 32)
    Options = BayesianBitsOptions

    def __init__(self, w_bits: int = 32, a_bits: int = 32, **options):
        super().__init__(w_bits, a_bits, **options)
        o = self.options
        fixed = {(32, 32): None, (8, 8): "fixed_8bit", (4, 8): "fixed_48bit"}
        if (self.w_bits, self.a_bits) not in fixed:
            raise QbenchError(
                f"bayesian_bits learns its widths: use W32A32, or W8A8 / W4A8 for the pruning-only "
                f"fixed variants, not W{self.w_bits}A{self.a_bits}"
            )
        want = fixed[(self.w_bits, self.a_bits)]
        if want is not None:
            self.options = o.model_copy(update={"prune_only": True, "include_pruning": True, want: True})
        elif o.fixed_8bit or o.fixed_48bit:
            named = "W8A8" if o.fixed_8bit else "W4A8"
            raise QbenchError(f"bayesian_bits with fixed_8bit/fixed_48bit runs at {named}, not W32A32")
        self._log = None

    def notation(self) -> str:
        """``mu=<gating_lambda>`` (e.g. ``mu=0.01``): the widths are learned, so the
        regulariser's strength tells the configurations apart (the reported rows' notation)."""
        return f"mu={self.options.gating_lambda:g}"

    # -- building -----------------------------------------------------------------------
    def _fixed_bits(self) -> tuple[int | None, int | None]:
        o = self.options
        if o.fixed_8bit:
            return 8, 8
        if o.fixed_48bit:
            return 4, 8
        return None, None

    def _quantizer(self, *, weight: bool, channels: int | None, last: bool) -> Quantizer:
        o = self.options
        fw, fa = self._fixed_bits()
        prune_only = o.prune_only and weight and not last
        if not weight and o.prune_only and fa is None:
            return Identity()  # pruning only: activations stay in full precision
        return BayesianBitsQuantizer(
            weight=weight,
            log_alpha_init=(o.gamma_4_init, o.gamma_8_init, o.gamma_16_init, o.gamma_32_init),
            channels=channels if (weight and o.include_pruning and not last) else None,
            log_alpha_2_init=o.gamma_2_init,
            fixed_bits=fw if weight else fa,
            prune_only=prune_only,
            gating=o.gating_method,
            reg_type=o.reg_type,
        )

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self._log = ctx.log
        first, last = first_last_layers(model)
        example = calib_example(model, ctx)
        macs = count_macs(model, example) if example is not None else {}
        pairs = conv_bn_pairs(model, example) if self.options.fold_bn else []

        def make_act(m: nn.Module, name: str, b: int) -> Quantizer:
            if name == first:
                if self.options.first_input_bits >= 32 or (self.options.prune_only and self._fixed_bits()[1] is None):
                    return Identity()
                return BayesianBitsQuantizer(weight=False, fixed_bits=8, regularize=False)
            return self._quantizer(weight=False, channels=None, last=name == last)

        model = quantize_model(
            model,
            lambda m, n, b: self._quantizer(weight=True, channels=m.weight.shape[0], last=n == last),
            make_act,
            16,
            16,
            first_last="same",
            first_last_names=(first, last),
        )
        for name, bn_name in pairs:  # conv/linear + BatchNorm -> one folded layer
            layer = model.get_submodule(name)
            if isinstance(layer, (QuantConv2d, QuantLinear)):
                set_submodule(model, name, fold_bn(layer, model.get_submodule(bn_name)))
                set_submodule(model, bn_name, nn.Identity())
        top = max(macs.values()) if macs else 0
        for name, layer in quant_layers(model):
            wq, aq = layer.weight_quantizer, layer.act_quantizer
            if isinstance(wq, BayesianBitsQuantizer):
                with torch.no_grad():
                    wq.init_range(layer.weight_to_quantize() if isinstance(layer, _FoldedBN) else layer.weight)
            ratio = macs.get(name, 0) / top if top else -1.0
            for q, is_act in ((wq, False), (aq, True)):
                # pruning only: the official code gives activations no MAC count (B(b) = 1)
                if isinstance(q, BayesianBitsQuantizer) and not (is_act and self.options.prune_only):
                    q.set_mac_ratio(ratio)
        return model

    @contextmanager
    def calibration_mode(self, model: nn.Module) -> Iterator[None]:
        """Initialise the activation ranges on the first calibration batch with the model in
        training mode, as the official code does on its first (training-mode) forward pass
        (``init_xminmax``): BatchNorms, folded or not, normalise with the batch statistics,
        so each range sees the activations that training will feed it. In eval mode a model
        trained from scratch (running statistics 0 and 1) shrinks its activations layer by
        layer (VGG-7: the classifier's input range started at ~0.01 while training fed it
        values up to ~3, every value clipped to one constant and the model stuck at chance).
        The quantizers themselves stay in eval mode (deterministic test-time gates, all on
        at their initial log-alpha; plain rounding); BatchNorm running statistics are
        restored afterwards, so they do not move. (:meth:`Method.calibrate` runs the batches.)"""
        from torch.nn.modules.batchnorm import _BatchNorm

        bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        saved = [{k: v.clone() for k, v in m._buffers.items() if v is not None} for m in bns]
        model.train()
        for q in model.modules():
            if isinstance(q, Quantizer):
                q.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for m, bufs in zip(bns, saved, strict=True):
                    for k, v in bufs.items():
                        m._buffers[k].copy_(v)

    # -- training -----------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """``mu * sum_q R_q`` over the gated quantizers (``gate_loss``); none once frozen."""
        mu = self.options.gating_lambda
        terms = [q.regularizer() for _, q in bb_quantizers(model) if q.regularize and not q.is_frozen()]
        if not mu or not terms:
            return None
        return mu * torch.stack([t.reshape(()) for t in terms]).sum()

    def param_groups(self, model: nn.Module, recipe: Recipe) -> list[dict] | None:
        """Weights (recipe lr; weight decay on conv/linear weights as the recipe says, none
        on BN and biases), gates (``lr_q``) and ranges (``lr_s``), no decay on either."""
        o = self.options
        return self._groups(model, recipe.lr, o.lr_q, o.lr_s, recipe.weight_decay, o.schedule_quantizer_lr)

    @staticmethod
    def _groups(
        model: nn.Module, lr: float, lr_q: float, lr_s: float, wd: float, schedule_quantizers: bool = True
    ) -> list[dict]:
        gates, scales, quant = [], [], set()
        for _, q in bb_quantizers(model):
            for pname, p in q.named_parameters(recurse=False):
                quant.add(id(p))
                if p.requires_grad:
                    (scales if pname == "x_max" else gates).append(p)
        decay, rest = [], []
        for m in model.modules():
            for pname, p in m.named_parameters(recurse=False):
                if id(p) in quant or not p.requires_grad:
                    continue
                is_weight = isinstance(m, (nn.Conv2d, nn.Linear)) and pname == "weight"
                (decay if is_weight else rest).append(p)
        groups = [
            {"params": decay, "lr": lr, "weight_decay": wd, "name": "weights"},
            {"params": rest, "lr": lr, "weight_decay": 0.0, "name": "weights_no_decay"},
            {"params": gates, "lr": lr_q, "weight_decay": 0.0, "name": "gates", "scheduled": schedule_quantizers},
            {"params": scales, "lr": lr_s, "weight_decay": 0.0, "name": "scales", "scheduled": schedule_quantizers},
        ]
        return [g for g in groups if g["params"]]

    def train(self, model: nn.Module, ctx: MethodContext) -> bool:
        """The main stage, then (``fixed_gate_finetune_epochs``) fine-tuning with the gates
        frozen at their test-time decision and no regulariser."""
        ctx.fit(model, stage="train")
        epochs = self.options.fixed_gate_finetune_epochs
        if epochs > 0:
            self.freeze(model)
            o = self.options
            r = ctx.recipe.with_(lr=o.finetune_lr, epochs=epochs, schedule="cosine", warmup_epochs=0)
            groups = self._groups(model, o.finetune_lr, o.finetune_lr_s, o.finetune_lr_s, r.weight_decay)
            ctx.fit(model, stage="finetune", recipe=r, param_groups=groups, extra_loss=lambda m: None)
        return True

    @staticmethod
    def freeze(model: nn.Module) -> None:
        """Gates at their test-time decision; folded BatchNorms at their running statistics."""
        for _, q in bb_quantizers(model):
            if not q.is_frozen():
                q.freeze()
        for _, layer in folded_layers(model):
            layer.freeze_bn()

    # -- result -------------------------------------------------------------------------
    def finalize(self, model: nn.Module) -> nn.Module:
        """Freeze every gate at its test-time decision; log the learned widths."""
        self.freeze(model)
        model.eval()
        if self._log is not None:
            self._log(self.learned(model))
        return model

    @staticmethod
    def learned(model: nn.Module) -> dict[str, float]:
        """Per layer: ``bb/w_bits/<layer>``, ``bb/a_bits/<layer>``, ``bb/pruned_channels/<layer>``
        (fraction); overall ``bb/mean_w_bits``, ``bb/mean_a_bits`` (over gated tensors) and
        ``bb/relative_bops`` (percent of the all-32-bit model, as ``print_bitops`` counts:
        MACs x a_bits x w_bits x kept output channels)."""
        out: dict[str, float] = {}
        wbits, abits = [], []
        bops = base = 0.0
        for name, layer in quant_layers(model):
            wq, aq = layer.weight_quantizer, layer.act_quantizer
            wb = wq.bits if wq.enabled else 32
            ab = aq.bits if aq.enabled else 32
            keep = wq.keep_ratio() if isinstance(wq, BayesianBitsQuantizer) else 1.0
            out[f"bb/w_bits/{name}"] = float(wb)
            out[f"bb/a_bits/{name}"] = float(ab)
            if isinstance(wq, BayesianBitsQuantizer):
                wbits.append(wb)
                if wq.log_alpha_2 is not None:
                    out[f"bb/pruned_channels/{name}"] = 1.0 - keep
            if isinstance(aq, BayesianBitsQuantizer) and aq.regularize:
                abits.append(ab)
            macs = wq._mac_ratio() if isinstance(wq, BayesianBitsQuantizer) else -1.0
            if macs >= 0:
                bops += macs * wb * ab * keep
                base += macs * 32 * 32
        if wbits:
            out["bb/mean_w_bits"] = sum(wbits) / len(wbits)
        if abits:
            out["bb/mean_a_bits"] = sum(abits) / len(abits)
        if base:
            out["bb/relative_bops"] = 100.0 * bops / base
        return out
