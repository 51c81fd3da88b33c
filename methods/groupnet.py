r"""Group-Net: K binary bases per group, combined with learned scalars.

Zhuang, Shen, Tan, Liu, Reid. "Structured Binary Neural Network for Accurate Image
Classification and Semantic Segmentation", CVPR 2019. https://arxiv.org/abs/1811.10413
(code: the EasyQuantization framework, github.com/blueardour/model-quantization, also
ziplab/QTool; the dashboard row "ResNet-18 1/1, cabs,bireal,base=5,without-softgate" is its
``config.group-net.eval.imagenet.bin.resnet18.base5.cabs``).

Binarization (the official ``xnor`` quantizers), with :math:`\mathrm{sign}(0) = +1`:

.. math::
    \hat w = E\,\mathrm{sign}(w), \quad E = \langle |w| \rangle \text{ (per tensor, the row's
    ``wt_quant_group=1``; per output channel with ``weight_scale="channel"``)}, \qquad
    \hat x = \mathrm{sign}(x)

    \partial \hat w / \partial w := 1, \quad \partial \hat x / \partial x := 1
    \quad (\text{``ste="clipped"``: } 1_{|\cdot| \le 1})

``E`` is computed from the detached weights and the straight-through gradient is not
multiplied by it (the official ``XnorWeight``/``XnorActivation`` with ``grad_type='none'``).

**Group-wise decomposition** (the paper's sec. 3.2, the dashboard row): every residual
basic block ``G`` (torchvision's ``BasicBlock``) becomes K parallel binary blocks
:math:`B_k` (own binary convs and BatchNorms) combined by learned scalars,

.. math::
    G(x) \approx \sum_{k=1}^{K} \lambda_k B_k(x), \qquad \lambda_k = 1/K \text{ at start}

Inside a branch (``order="cabs"``, ``bireal=True``, the row's keywords), each binary conv
is followed by ReLU, then BatchNorm, then its own Bi-Real skip:
:math:`h = \mathrm{BN}_1(\mathrm{ReLU}(\mathrm{conv}_1(x))) + s(x)`,
:math:`B_k(x) = \mathrm{BN}_2(\mathrm{ReLU}(\mathrm{conv}_2(h))) + h`; ``s`` is the block's
shortcut (identity, or one binary 1x1 strided conv + BN shared by the branches: the row's
``singleconv``). ``bireal=False`` drops the per-conv skips and adds ``s(x)`` once after the
combination; ``order="cbsa"`` is torchvision's conv - BN - (+skip) - ReLU.

**Layer-wise decomposition** (the paper's eq. 3), for every other binarised Conv2d/Linear
(plain CNNs, Bottleneck blocks): :math:`y = \sum_k \lambda_k\, \hat W_k * \mathrm{sign}(x) + b`
(a layer's bias, if any, added once after the combination).

* K = ``base`` (default 5, the row's ``base=5``); the first conv and the last linear layer
  stay in full precision, as in the paper and the official ResNet.
* Without softgate: the branches are combined by the scalars only (``softgate=True``, the
  paper's learned soft connections between groups, is not implemented and is rejected).
* Initialisation from the full-precision parent. Branches started from identical weights
  would stay identical (same input, same gradient), so base k starts from the k-th residual
  of a greedy binary decomposition of the pretrained weight:
  :math:`r_1 = W,\ r_{k+1} = r_k - E(r_k)\,\mathrm{sign}(r_k)`. Layer-wise,
  :math:`\lambda_k = 1` at start, so :math:`\sum_k \lambda_k \hat W_k \approx W`.
  Group-wise, each branch's BatchNorms start as copies of the block's.
* A ReLU module left outside the rebuilt blocks (a plain CNN's, the stem's) is removed: it
  would feed a binary layer, and the sign of a ReLU output is +1 everywhere.

Options: ``base`` (5), ``order`` ("cabs"), ``bireal`` (True), ``softgate`` (False only),
``weight_scale`` ("tensor"), ``ste`` ("identity"), ``decomposition`` ("group": group-wise
where the model has basic blocks, layer-wise elsewhere; "layer": layer-wise everywhere).

Deviations: the official model is built with K branches from scratch and fine-tuned from
a Group-Net checkpoint; here it is rewritten from a trained torchvision ResNet (the residual
initialisation above is qbench's). The official ResNet variant's stem and strides are not
reproduced (torchvision's are kept); only torchvision's ``BasicBlock`` is decomposed
group-wise (other blocks fall back to layer-wise).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision.models.resnet import BasicBlock

from .base import Method, MethodContext, Paper, calib_example
from .binary import SignActivation, SignWeight, binary_sign, mean_abs
from .footprint import Footprint, footprint
from .layers import first_last_layers
from .modules import QuantConv2d, QuantLinear, set_submodule

Ste = Literal["identity", "clipped"]


#: the ``ste`` option's names for the shared sign rules of :mod:`qbench.methods.binary`
RULE = {"identity": "pass", "clipped": "STE"}


def _scaling(per_channel: bool) -> str:
    return "channel" if per_channel else "tensor"


def weight_quantizer(channels: int, per_channel: bool = False, ste: Ste = "identity") -> SignWeight:
    """E sign(w) (E = mean |w| per tensor, or per output channel; not differentiated), the
    gradient straight through (times 1_{|w| <= 1} if ``clipped``)."""
    return SignWeight(channels, _scaling(per_channel), RULE[ste])


def act_quantizer(ste: Ste = "identity") -> SignActivation:
    """sign(x), no scale (the official ``XnorActivation`` with E = 1)."""
    return SignActivation(RULE[ste])


def residual_bases(w: torch.Tensor, k: int, per_channel: bool) -> list[torch.Tensor]:
    """r_1 = w, r_{j+1} = r_j - E(r_j) sign(r_j): the latent weights of K bases."""
    out, r = [], w.detach().clone()
    for _ in range(k):
        out.append(r.clone())
        r = r - binary_sign(r) * mean_abs(r, _scaling(per_channel))
    return out


def binary_layer(layer: nn.Module, weight: torch.Tensor, per_channel: bool, ste: Ste) -> nn.Module:
    """A 1-bit copy of a Conv2d/Linear (binary weights and inputs) with latent ``weight``."""
    fk = {"device": weight.device, "dtype": weight.dtype}
    bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        c = layer
        new: nn.Module = QuantConv2d(
            c.in_channels,
            c.out_channels,
            c.kernel_size,
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
            bias,
            c.padding_mode,
            **fk,
        )
    elif isinstance(layer, nn.Linear):
        new = QuantLinear(layer.in_features, layer.out_features, bias, **fk)
    else:
        raise TypeError(f"groupnet binarises Conv2d/Linear layers, got {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias:
            new.bias.copy_(layer.bias)
    new.weight_quantizer = weight_quantizer(new.weight.shape[0], per_channel, ste)
    new.act_quantizer = act_quantizer(ste)
    return new


class BinaryBases(nn.Module):
    """Layer-wise decomposition: y = sum_k lambda_k B_k(x), K binary layers."""

    def __init__(self, layer: nn.Module, k: int, per_channel: bool = False, ste: Ste = "identity"):
        super().__init__()
        ws = residual_bases(layer.weight, k, per_channel)
        self.branches = nn.ModuleList(binary_layer(layer, w, per_channel, ste) for w in ws)
        for b in self.branches:
            b.bias = None
        # a bias is added once, after the combination (a real-valued tensor)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.lambdas = nn.Parameter(torch.ones(k, device=layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for lam, b in zip(self.lambdas, self.branches, strict=True):
            out = lam * b(x) if out is None else out + lam * b(x)
        if self.bias is not None:
            out = out + (self.bias if out.dim() == 2 else self.bias.reshape(-1, 1, 1))
        return out


class GroupBranch(nn.Module):
    """One binary copy of a basic block's main path: conv1, bn1, conv2, bn2."""

    def __init__(self, block: BasicBlock, w1: torch.Tensor, w2: torch.Tensor, per_channel: bool, ste: Ste):
        super().__init__()
        self.conv1 = binary_layer(block.conv1, w1, per_channel, ste)
        self.bn1 = copy.deepcopy(block.bn1)
        self.conv2 = binary_layer(block.conv2, w2, per_channel, ste)
        self.bn2 = copy.deepcopy(block.bn2)


def _step(x: torch.Tensor, conv, bn, skip: torch.Tensor | None, order: str) -> torch.Tensor:
    """One conv of a branch: cabs = conv, ReLU, BN, (+skip); cbsa = conv, BN, (+skip), ReLU."""
    out = conv(x)
    if order == "cabs":
        out = bn(torch.relu(out))
        return out if skip is None else out + skip
    out = bn(out)
    out = out if skip is None else out + skip
    return torch.relu(out)


class GroupNetBlock(nn.Module):
    """Group-wise decomposition of a basic block: sum_k lambda_k B_k(x) (see the module doc)."""

    def __init__(
        self,
        block: BasicBlock,
        k: int,
        order: str = "cabs",
        bireal: bool = True,
        per_channel: bool = False,
        ste: Ste = "identity",
    ):
        super().__init__()
        self.order, self.bireal = order, bireal
        w1 = residual_bases(block.conv1.weight, k, per_channel)
        w2 = residual_bases(block.conv2.weight, k, per_channel)
        self.branches = nn.ModuleList(GroupBranch(block, a, b, per_channel, ste) for a, b in zip(w1, w2, strict=True))
        self.downsample = None
        if block.downsample is not None:
            ds = copy.deepcopy(block.downsample)
            for i, m in enumerate(ds):
                if isinstance(m, nn.Conv2d):  # one binary strided 1x1 conv (official ``singleconv``)
                    ds[i] = binary_layer(m, m.weight, per_channel, ste)
            self.downsample = ds
        self.lambdas = nn.Parameter(torch.full((k,), 1.0 / k, device=block.conv1.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = None
        for lam, b in zip(self.lambdas, self.branches, strict=True):
            if self.bireal:
                h = _step(x, b.conv1, b.bn1, skip, self.order)
                y = _step(h, b.conv2, b.bn2, h, self.order)
            else:
                y = _step(_step(x, b.conv1, b.bn1, None, self.order), b.conv2, b.bn2, None, self.order)
            out = lam * y if out is None else out + lam * y
        if not self.bireal:
            out = out + skip
            if self.order == "cbsa":
                out = torch.relu(out)
        return out


class GroupNetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: int = Field(5, ge=1, le=16)
    decomposition: Literal["group", "layer"] = "group"
    order: Literal["cabs", "cbsa"] = "cabs"
    bireal: bool = True
    softgate: Literal[False] = False
    weight_scale: Literal["tensor", "channel"] = "tensor"
    ste: Ste = "identity"


class GroupNet(Method):
    name = "groupnet"
    paper = Paper(
        title="Structured Binary Neural Network for Accurate Image Classification and Semantic Segmentation",
        authors="Zhuang, Shen, Tan, Liu, Reid",
        venue="CVPR",
        year=2019,
        url="https://arxiv.org/abs/1811.10413",
        code="https://github.com/blueardour/model-quantization",
    )
    comment = (
        "without softgate; from the FP32 torchvision ResNet with residual-decomposition "
        "initialisation of the K bases; torchvision stem"
    )
    status = "follows the official code"
    weight_bits = (1,)
    act_bits = (1,)
    Options = GroupNetOptions

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        o = self.options
        # the full-precision model's size and MACs, measured before it grows K copies of
        # each binarised layer: the reference of the compression ratio and relative BOPs
        self._reference = footprint(model, calib_example(model, ctx))
        per_channel = o.weight_scale == "channel"
        ends = set(first_last_layers(model))
        if o.decomposition == "group":
            blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, BasicBlock)]
            for name, block in blocks:
                set_submodule(model, name, GroupNetBlock(block, o.base, o.order, o.bireal, per_channel, o.ste))
        inside = (QuantConv2d, QuantLinear, BinaryBases, GroupNetBlock)
        taken = {id(m) for b in model.modules() if isinstance(b, inside) for m in b.modules()}
        layers = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in taken and n not in ends
        ]
        for name, layer in layers:
            set_submodule(model, name, BinaryBases(layer, o.base, per_channel, o.ste))
        # a ReLU module outside the rebuilt blocks feeds a binary layer's sign, and the sign
        # of a ReLU output is +1 everywhere: drop it (the blocks keep their own, cabs order)
        inside = {id(m) for b in model.modules() if isinstance(b, GroupNetBlock) for m in b.modules()}
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.ReLU) and id(m) not in inside:
                set_submodule(model, name, nn.Identity())
        return model

    def footprint(self, model: nn.Module, example: torch.Tensor | None = None) -> Footprint:
        """The binary model's size and BOPs (K 1-bit tensors per binarised layer), against
        the full-precision model it was built from (not K full-precision copies)."""
        fp = footprint(model, example)
        ref = getattr(self, "_reference", None)
        return fp.against(ref) if ref is not None else fp
