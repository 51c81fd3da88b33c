"""The pre-activation ResNet-18 of EasyQuantization ("ResNet-18, PreBN,bacs").

EasyQuantization (github.com/blueardour/model-quantization) reports most of its ImageNet
results on a ResNet variant selected by the keywords ``origin,preBN,bacs`` of its
``models/resnet.py`` (full precision: 70.1 top-1), not on torchvision's ResNet
("Torch-R18"). Read from that code, the variant is:

* stem (``preBN``): 7x7 stride-2 convolution and 3x3 stride-2 max pooling, with no
  batch normalisation or ReLU after them (the first block normalises its input);
* basic block (``bacs`` = BN, activation, convolution, skip; ``origin`` = one skip per
  block): ``out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x)``, so every
  quantized convolution sees a batch-normalised, ReLU-ed input (He et al.,
  "Identity Mappings in Deep Residual Networks", ECCV 2016);
* shortcut where the shape changes: 2x2 average pooling (stride 2), then BN, ReLU and a
  1x1 convolution (quantized like the others in that code);
* head: BN on the last stage's output (no ReLU), global average pooling, linear.

Initialisation as that code: convolutions He-normal (fan-out), BN weight 1 and bias 0.
``stem: cifar`` (or ``auto`` below 64x64 inputs) swaps the stem for a 3x3 stride-1
convolution without pooling, as the code's ``cifar10`` keyword does. 11.69M parameters at
1000 classes. ``weights``: a local file (the EasyQuantization checkpoints use other names;
convert them first).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QbenchError
from . import register_model
from .weights import apply_weights


class PreActBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            layers: list[nn.Module] = [nn.AvgPool2d(stride)] if stride != 1 else []
            if inplanes != planes:
                layers += [
                    nn.BatchNorm2d(inplanes),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(inplanes, planes, 1, bias=False),
                ]
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        # relu1 is in place on a fresh tensor (bn1's output), never on x itself
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + residual


class PreActResNet(nn.Module):
    qbench_first_last = ("conv1", "fc")

    def __init__(
        self,
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        cifar_stem: bool = False,
    ):
        super().__init__()
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, stages = 64, []
        for i, n in enumerate(layers):
            planes = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(inplanes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(self.bn2(x)), 1))


@register_model("preact_resnet18")
def preact_resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    weights: str | None = None,
    stem: str = "auto",
) -> nn.Module:
    """Pre-activation ResNet-18 of EasyQuantization (PreBN, bacs), 11.7M parameters."""
    if stem not in ("auto", "imagenet", "cifar"):
        raise QbenchError(f"stem must be auto, imagenet or cifar, got {stem!r}", "preact_resnet18.stem")
    cifar = stem == "cifar" or (stem == "auto" and image_size < 64)
    model = PreActResNet([2, 2, 2, 2], num_classes, in_channels, cifar)
    return apply_weights(model, weights, None, "preact_resnet18.weights", may_differ=("fc.", "conv1."))
