"""VGG-7 ("VGG-small"), the CIFAR-10 network of Bayesian Bits.

van Baalen et al., "Bayesian Bits: Unifying Quantization and Pruning", NeurIPS 2020;
the network of their code (github.com/Qualcomm-AI-research/BayesianBits,
``benchmarks/image_net/models/cifar_models.py``, ``VGGQuantized``):
2x128C3 - MP2 - 2x256C3 - MP2 - 2x512C3 - MP2 - 1024FC - 10FC.
Every 3x3 convolution (padding 1, no bias) and the 1024-unit layer are followed by batch
normalisation and ReLU (their layers fold BN into the weights for quantization; here BN
is a separate module, which a method may fold); the classifier has a bias. On 32x32
inputs the features are 512 x 4 x 4 = 8192. About 12.98M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class VGG7(nn.Module):
    qbench_first_last = ("features.0", "classifier.3")

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 128):
        super().__init__()
        w = width
        side = image_size // 8
        if side < 1:
            raise ValueError(f"VGG-7 needs inputs of at least 8x8, got {image_size}")
        self.features = nn.Sequential(
            *_conv(in_channels, w), *_conv(w, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), *_conv(4 * w, 4 * w), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(4 * w * side * side, 8 * w, bias=False),
            nn.BatchNorm1d(8 * w),
            nn.ReLU(inplace=True),
            nn.Linear(8 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg7")
def vgg7(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 128) -> nn.Module:
    """VGG-7 / VGG-small of Bayesian Bits (CIFAR): 2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-1024FC."""
    return VGG7(num_classes, in_channels, image_size, width)
