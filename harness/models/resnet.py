"""ResNet-18/34/50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016),
torchvision's implementation (``torchvision.models.resnet``), as the papers quantize it
(APoT, LSQ, Bayesian Bits, BGD, PQF and EasyQuantization's "Torch-R18").

Options: ``weights`` (a file path, or torchvision's ``DEFAULT`` / ``IMAGENET1K_V1`` /
``IMAGENET1K_V2`` from the torch hub cache; see :mod:`qbench.harness.models.weights`) and
``stem``: ``imagenet`` (7x7 stride-2 convolution and max pooling, torchvision's), ``cifar``
(a 3x3 stride-1 convolution and no pooling, the usual adaptation to 32x32 inputs) or
``auto`` (``cifar`` below 64x64 inputs, else ``imagenet``). Parameters at 1000 classes:
ResNet-18 11.69M, ResNet-34 21.80M, ResNet-50 25.56M.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from ..errors import QbenchError
from . import register_model
from .weights import apply_weights

STEMS = ("auto", "imagenet", "cifar")


def build(arch: str, num_classes: int, in_channels: int, image_size: int, weights: str | None, stem: str) -> nn.Module:
    if stem not in STEMS:
        raise QbenchError(f"stem must be one of {STEMS}, got {stem!r}", f"{arch}.stem")
    builder = getattr(tvm, arch)
    model = builder(weights=None, num_classes=num_classes)
    cifar = stem == "cifar" or (stem == "auto" and image_size < 64)
    if cifar:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    if cifar or in_channels != 3:
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.qbench_first_last = ("conv1", "fc")
    return apply_weights(model, weights, builder, f"{arch}.weights", may_differ=("fc.", "conv1."))


@register_model("resnet18")
def resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    weights: str | None = None,
    stem: str = "auto",
) -> nn.Module:
    """ResNet-18, torchvision's (11.7M parameters); weights from a file or the hub cache."""
    return build("resnet18", num_classes, in_channels, image_size, weights, stem)


@register_model("resnet34")
def resnet34(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    weights: str | None = None,
    stem: str = "auto",
) -> nn.Module:
    """ResNet-34, torchvision's (21.8M parameters); weights from a file or the hub cache."""
    return build("resnet34", num_classes, in_channels, image_size, weights, stem)


@register_model("resnet50")
def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    weights: str | None = None,
    stem: str = "auto",
) -> nn.Module:
    """ResNet-50, torchvision's (25.6M parameters); weights from a file or the hub cache."""
    return build("resnet50", num_classes, in_channels, image_size, weights, stem)
