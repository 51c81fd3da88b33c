"""ResNets for 32x32 inputs (CIFAR): ResNet-20 and ResNet-56.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section
4.2: a 3x3 stem with 16 filters, three stages of ``n`` basic blocks with 16, 32 and 64
filters (stride 2 at the first block of stages 2 and 3), global average pooling and a
linear classifier; depth = 6n + 2 (n = 3: ResNet-20, n = 9: ResNet-56).

The layout and the parameter/buffer names follow the CIFAR ResNet of the APoT code
(github.com/yhhhli/APoT_Quantization, CIFAR10/models/resnet.py), so its released
checkpoints load after stripping the ``module.`` prefix: ``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``, a projection shortcut
``layer{2,3}.0.downsample.0`` (1x1 conv, stride 2) + ``downsample.1`` (BN) where the shape
changes (the paper's option B), and ``fc``. Initialisation as that code: convolutions
He-normal with fan-out, BN weight 1 and bias 0, the classifier PyTorch's default.

``shortcut="pad"`` gives the paper's option A instead (identity shortcut, stride-2
subsampling and zero-padded channels, no parameters), used by other CIFAR papers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_model

SHORTCUTS = ("conv", "pad")


class _PadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride = stride
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            if shortcut == "conv":
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                self.downsample = _PadShortcut(stride, planes - inplanes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # not in place: ``identity`` may alias ``x``, which autograd still needs
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    qbench_first_last = ("conv1", "fc")

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        shortcut: str = "conv",
    ):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        stages = []
        for i in range(3):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(inplanes, planes, stride if j == 0 else 1, shortcut))
                inplanes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        # the official code uses AvgPool2d(8) on the 8x8 map: identical for 32x32 inputs
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # flatten, not view: works for channels_last tensors too
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(depth: int, num_classes: int, in_channels: int, width: int, shortcut: str) -> nn.Module:
    return CifarResNet((depth - 2) // 6, num_classes, in_channels, width, shortcut)


@register_model("resnet20")
def resnet20(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: int = 16,
    shortcut: str = "conv",
) -> nn.Module:
    return _build(20, num_classes, in_channels, width, shortcut)


@register_model("resnet56")
def resnet56(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: int = 16,
    shortcut: str = "conv",
) -> nn.Module:
    return _build(56, num_classes, in_channels, width, shortcut)
