r"""Bi-Real Net: 1-bit weights and activations with ApproxSign and magnitude-aware gradients.

Liu, Wu, Luo, Yang, Liu, Cheng. "Bi-Real Net: Enhancing the Performance of 1-bit CNNs With
Improved Representational Capability and Advanced Training Algorithm", ECCV 2018.
https://arxiv.org/abs/1808.00278 (official code: github.com/liuzechun/Bi-Real-net, Caffe
and a later PyTorch version).

The model half of the paper (a real-valued identity shortcut around every binary
convolution) is :mod:`qbench.harness.models.bireal` (``bireal_resnet18/34``,
``bireal_resnet20/56``); this module is the training half, applied to every conv/linear
layer but the first and the last.

* Activations (each binarised layer's input), forward :math:`a_b = \mathrm{sign}(a_r)`;
  backward, the derivative of the piecewise polynomial ApproxSign

  .. math::
      \frac{\partial\,\mathrm{ApproxSign}(x)}{\partial x} =
      \begin{cases} 2 + 2x & -1 \le x < 0 \\ 2 - 2x & 0 \le x < 1 \\ 0 & \text{otherwise}
      \end{cases}

  (``act_grad="approx_sign"``; ``"ste"`` gives the straight-through
  :math:`1_{|x| \le 1}` of earlier binary networks, BinaryNet's).
* Weights, per output channel :math:`t` of a layer with :math:`n` weights per channel:
  :math:`W_b^t = \alpha^t\,\mathrm{sign}(W_r^t)`, :math:`\alpha^t = \lVert W_r^t
  \rVert_1 / n`; backward, the magnitude-aware gradient (``weight_grad="magnitude_aware"``)

  .. math::
      \frac{\partial L}{\partial W_r^t} = \frac{\partial L}{\partial W_b^t}\,
      \alpha^t\, 1_{|W_r^t| \le 1}

  (the term through :math:`\partial \alpha / \partial W_r` is neglected, as in the paper).
  ``weight_grad="ste"`` drops the factor :math:`\alpha^t`:
  :math:`\partial L / \partial W_r = \partial L / \partial W_b\, 1_{|W_r| \le 1}`, which is
  what the official PyTorch code computes (a detached scale times ``sign`` plus
  ``clamp(w, -1, 1)`` through the straight-through trick).
* ``sign(0) = +1`` for weights and activations (the Caffe layer's ``x >= 0 ? 1 : -1``), so
  every binarised tensor holds exactly two values per scale group.
* Full precision: the first convolution and the last linear layer (``first_last="fp"``,
  the paper's and official code's policy), the 1x1 convolutions of the downsampling
  shortcuts (official code; ``binarize_downsample=True`` binarises them too), BatchNorm,
  the real-valued shortcuts.
* Footprint: 1 bit per binarised weight plus its per-output-channel scales
  :math:`\alpha^t` at 32 bits (the paper folds them into BatchNorm after training; they are
  counted here anyway); BOPs count a binarised layer's MACs at 1 x 1 bit.

Training, the paper's two steps: (1) a full-precision model whose pre-conv nonlinearity
is ``clip(x, -1, 1)`` (the ``bireal_*`` models' default ``act="clip"``, trained by the
model's fp32 baseline cell; the paper pre-trains with ReLU, then leaky-clip, then clip:
model option ``act``); (2) this method, initialised from it (``init="baseline"``).
Recipes: the paper (Caffe) uses SGD, momentum 0.9, weight decay 0 (18 layers: 20 epochs,
lr 0.01, x0.1 at epochs 10 and 15), then 1 epoch retraining BatchNorm only; the official
PyTorch code trains from scratch with Adam, lr 1e-3 decayed linearly to 0 over 256
epochs, weight decay 0, label smoothing 0.1. The optimizer and schedule are the suite's
recipe (``optimizer: adam``); the method's ``weight_decay`` option (default 0, the
paper's) replaces the recipe's.

Options:

* ``first_last`` (``"fp"``; ``"same"`` binarises the first and last layers too);
* ``weight_grad`` (``"magnitude_aware"``, or ``"ste"``); ``act_grad`` (``"approx_sign"``,
  or ``"ste"``);
* ``binarize_downsample`` (False);
* ``weight_decay`` (0.0; None: the recipe's);
* ``allow_relu`` (False: a model holding a ReLU module is refused, since the sign of a
  ReLU output is always +1; use a ``bireal_*`` model with ``act="clip"``).

Deviations: the paper's final step (retraining BatchNorm with the scales folded in) is
not run: the scales stay in the forward pass (folding them into BatchNorm gives the same
function) and are counted in the footprint; the activation binariser sits on each binarised layer's
input (qbench's layer wrapper) rather than being a module of the block, which is the same
function since the ``bireal_*`` blocks' ``clip`` is the identity on ApproxSign's support;
sign(0) = +1 (the official PyTorch ``torch.sign`` gives 0); the official PyTorch
straight-through weight gradient is the ``weight_grad="ste"`` option, not the default.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeFloat
from torch import nn

from .base import Method, MethodContext, Paper
from .binary import SignActivation, SignWeight, binary_weight, sign_ste
from .errors import QbenchError
from .modules import quantize_model
from .recipe import Recipe

BIREAL = Paper(
    title=(
        "Bi-Real Net: Enhancing the Performance of 1-bit CNNs With Improved Representational "
        "Capability and Advanced Training Algorithm"
    ),
    authors="Liu, Wu, Luo, Yang, Liu, Cheng",
    venue="ECCV",
    year=2018,
    url="https://arxiv.org/abs/1808.00278",
    code="https://github.com/liuzechun/Bi-Real-net",
)


#: the options' names for the shared rules of :mod:`qbench.methods.binary`
ACT_RULE = {"approx_sign": "triangle", "ste": "STE"}
WEIGHT_RULE = {"magnitude_aware": "magnitude", "ste": "STE"}


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's activation binariser: sign(x) (``sign(0) = +1``) with ApproxSign's
    derivative ``2 - 2|x|`` on [-1, 1], 0 elsewhere (the shared rule "triangle")."""
    return sign_ste(x, "triangle")


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with the straight-through derivative 1_{|x| <= 1}."""
    return sign_ste(x, "STE")


def magnitude_aware_sign(w: torch.Tensor, magnitude_aware: bool = True) -> torch.Tensor:
    """Bi-Real's weight binariser: alpha^t sign(W^t) per output channel (alpha^t = mean |W^t|,
    no gradient through it), with the magnitude-aware gradient alpha^t 1_{|W| <= 1} (or,
    ``magnitude_aware=False``, the official PyTorch code's straight-through 1_{|W| <= 1})."""
    return binary_weight(w, "channel", "magnitude" if magnitude_aware else "STE")


class BiRealOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_last: Literal["fp", "same"] = "fp"
    weight_grad: Literal["magnitude_aware", "ste"] = "magnitude_aware"
    act_grad: Literal["approx_sign", "ste"] = "approx_sign"
    binarize_downsample: bool = False
    weight_decay: NonNegativeFloat | None = 0.0
    allow_relu: bool = False


def _in_downsample(name: str) -> bool:
    return "downsample" in name.split(".")


class BiReal(Method):
    name = "bireal"
    paper = BIREAL
    comment = (
        "scales kept in the forward pass (no final BN retraining); sign(0) = +1; "
        "fine-tuned from the clip(-1, 1) FP32 baseline; optimizer and schedule from the recipe"
    )
    status = "follows the paper (ApproxSign, magnitude-aware gradient) and the official model"
    weight_bits = (1,)
    act_bits = (1,)
    Options = BiRealOptions

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        o = self.options
        if not o.allow_relu:
            relus = [n for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
            if relus:
                raise QbenchError(
                    f"bireal binarises activations with sign, but the model has ReLU modules "
                    f"({', '.join(relus[:3])}{', ...' if len(relus) > 3 else ''}): the sign of a "
                    f"ReLU output is always +1. Use a bireal_* model with act='clip' (its default), "
                    f"or set allow_relu: true",
                    "bireal",
                )
        return quantize_model(
            model,
            lambda m, n, b: SignWeight(m.weight.shape[0], "channel", WEIGHT_RULE[o.weight_grad]),
            lambda m, n, b: SignActivation(ACT_RULE[o.act_grad]),
            self.w_bits,
            self.a_bits,
            first_last=o.first_last,
            skip=None if o.binarize_downsample else (lambda n, m: _in_downsample(n)),
        )

    def param_groups(self, model: nn.Module, recipe: Recipe) -> list[dict] | None:
        """The ``weight_decay`` option (the paper's 0) on conv/linear weights, none on BN
        and biases; None (the runner's default, the recipe's decay) when the option is None."""
        wd = self.options.weight_decay
        if wd is None:
            return None
        decay, rest = [], []
        for m in model.modules():
            for pname, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_weight = pname == "weight" and isinstance(m, (nn.Conv2d, nn.Linear))
                (decay if is_weight else rest).append(p)
        groups = [{"params": decay, "weight_decay": wd}]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        return groups
