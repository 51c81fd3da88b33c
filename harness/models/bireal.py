"""Bi-Real Net models: a real-valued identity shortcut around every 3x3 convolution.

Liu, Wu, Luo, Yang, Liu, Cheng. "Bi-Real Net: Enhancing the Performance of 1-bit CNNs With
Improved Representational Capability and Advanced Training Algorithm", ECCV 2018
(https://arxiv.org/abs/1808.00278; official code: github.com/liuzechun/Bi-Real-net,
``pytorch_implementation/BiReal18_34/birealnet.py`` and the Caffe prototxts).

A ResNet basic block holds two 3x3 convolutions under one shortcut; a Bi-Real block holds
one, so every convolution has its own real-valued identity shortcut. Block order (the
official code's and the paper's)::

    out = BN(conv3x3(act(x))) + shortcut(x)

``act`` is the nonlinearity in front of each convolution: the one the binary network
replaces by sign (the ``bireal`` method puts its ApproxSign on each binarised conv's
input; ``sign(act(x)) = sign(x)`` and, since ApproxSign's derivative is 0 outside
[-1, 1], the gradient is the same as well for ``clip`` and ``leaky_clip``). The real-valued
sum of the block is what flows on: nothing follows the addition.

* ``act="clip"`` (default): ``clip(x, -1, 1)``, the full-precision model the paper's
  binary training starts from (its pre-training step 3); ``"leaky_clip"``: identity on
  (-1, 1), slope 0.1 outside (step 2, the Caffe ``lClip`` layer); ``"relu"``: step 1.
* Downsampling shortcut (stride 2 or a change of width): 2x2 average pooling, stride 2,
  then a real-valued 1x1 convolution and BN (official PyTorch code; the Caffe prototxt
  pools the same way).
* ImageNet stem (official): 7x7 stride-2 convolution, BN, 3x3 stride-2 max pooling (no
  ReLU); head: global average pooling and a linear classifier (nothing in front of it).
  ``stem="cifar"`` (or ``"auto"`` below 64x64 inputs) uses a 3x3 stride-1 convolution and
  BN with no pooling, as qbench's ResNets do.
* ``bireal_resnet18`` (blocks 4, 4, 4, 4 of widths 64, 128, 256, 512; 16 one-conv blocks
  + stem + classifier) and ``bireal_resnet34`` (6, 8, 12, 6), as the official
  ``birealnet18``/``birealnet34``. Parameters at 1000 classes: 11,689,512 and 21,797,672,
  equal to the official models (and to torchvision's ResNet-18/34: the layers are the same,
  only the shortcuts differ).
* ``bireal_resnet20`` / ``bireal_resnet56`` (qbench's adaptation, no official CIFAR model):
  the CIFAR ResNet-20/56 (3x3 stem of ``width`` = 16 filters and BN, three stages of
  widths 16, 32, 64) with its 2n convolutions per stage as 2n Bi-Real blocks. Parameters
  at 10 classes: 272,474 (20) and 855,770 (56).

Deviations from the official code: the stride-1 downsampling shortcut (a change of width
only; it never occurs in these models) has no pooling (the official ``AvgPool2d(2, 1)``
would shrink the map by one pixel); the pooling rounds up (``ceil_mode``), so odd-sized maps
(small inputs) match the strided convolution's output (identical on even sizes, i.e. on
every 224x224 or 32x32 input); weights are initialised as torchvision's ResNets
(He-normal, fan-out) rather than ``rand * 0.001``, since Bi-Real starts from a trained
full-precision model; the first and last layers are named ``conv1`` and ``fc`` as the
official ones, the blocks' layers ``conv``, ``bn`` and ``downsample``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QbenchError
from . import register_model

ACTS = ("clip", "leaky_clip", "relu")
STEMS = ("auto", "imagenet", "cifar")


class LeakyClip(nn.Module):
    """Identity on (-1, 1), slope ``slope`` outside (the Caffe ``lClip`` layer)."""

    def __init__(self, slope: float = 0.1):
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.clamp(-1.0, 1.0)
        return c + self.slope * (x - c)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


def make_act(act: str) -> nn.Module:
    if act == "clip":
        return nn.Hardtanh(-1.0, 1.0)
    if act == "leaky_clip":
        return LeakyClip(0.1)
    if act == "relu":
        return nn.ReLU()
    raise QbenchError(f"act must be one of {ACTS}, got {act!r}", "bireal.act")


class BiRealBlock(nn.Module):
    """``BN(conv3x3(act(x))) + shortcut(x)``; the shortcut is the identity, or (stride 2 or
    a change of width) 2x2 average pooling + real 1x1 convolution + BN."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, act: str = "clip"):
        super().__init__()
        self.act = make_act(act)
        self.conv = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            pool = nn.AvgPool2d(kernel_size=2, stride=stride, ceil_mode=True) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(
                pool,
                nn.Conv2d(inplanes, planes, 1, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn(self.conv(self.act(x))) + identity


class BiRealNet(nn.Module):
    """Stem, stages of :class:`BiRealBlock` (stride 2 at the first block of every stage
    but the first), global average pooling, linear classifier."""

    qbench_first_last = ("conv1", "fc")

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        stem: str = "imagenet",
        act: str = "clip",
    ):
        super().__init__()
        if act not in ACTS:
            raise QbenchError(f"act must be one of {ACTS}, got {act!r}", "bireal.act")
        w0 = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w0, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(w0)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, w0, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(w0)
            self.maxpool = nn.Identity()
        inplanes = w0
        stages = []
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BiRealBlock(inplanes, planes, stride, act))
                inplanes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = len(stages)
        for i, stage in enumerate(stages, 1):
            setattr(self, f"layer{i}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        for i in range(1, self.layers + 1):
            x = getattr(self, f"layer{i}")(x)
        # flatten, not view: works for channels_last tensors too
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stem(stem: str, image_size: int, where: str) -> str:
    if stem not in STEMS:
        raise QbenchError(f"stem must be one of {STEMS}, got {stem!r}", f"{where}.stem")
    if stem == "auto":
        return "cifar" if image_size < 64 else "imagenet"
    return stem


@register_model("bireal_resnet18")
def bireal_resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    stem: str = "auto",
    act: str = "clip",
) -> nn.Module:
    """Bi-Real Net-18 (11.7M parameters at 1000 classes, as the official ``birealnet18``)."""
    s = _stem(stem, image_size, "bireal_resnet18")
    return BiRealNet((4, 4, 4, 4), (64, 128, 256, 512), num_classes, in_channels, s, act)


@register_model("bireal_resnet34")
def bireal_resnet34(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    stem: str = "auto",
    act: str = "clip",
) -> nn.Module:
    """Bi-Real Net-34 (21.8M parameters at 1000 classes, as the official ``birealnet34``)."""
    s = _stem(stem, image_size, "bireal_resnet34")
    return BiRealNet((6, 8, 12, 6), (64, 128, 256, 512), num_classes, in_channels, s, act)


def _cifar(depth: int, num_classes: int, in_channels: int, width: int, act: str) -> nn.Module:
    n = 2 * (depth - 2) // 6  # two one-conv blocks per ResNet basic block
    return BiRealNet((n, n, n), (width, 2 * width, 4 * width), num_classes, in_channels, "cifar", act)


@register_model("bireal_resnet20")
def bireal_resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: int = 16,
    act: str = "clip",
) -> nn.Module:
    """CIFAR ResNet-20 as a Bi-Real net: 18 one-conv blocks (0.27M parameters)."""
    return _cifar(20, num_classes, in_channels, width, act)


@register_model("bireal_resnet56")
def bireal_resnet56(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: int = 16,
    act: str = "clip",
) -> nn.Module:
    """CIFAR ResNet-56 as a Bi-Real net: 54 one-conv blocks (0.86M parameters)."""
    return _cifar(56, num_classes, in_channels, width, act)
