"""LeNet-5 as Bayesian Bits uses it on MNIST.

van Baalen et al., "Bayesian Bits: Unifying Quantization and Pruning", NeurIPS 2020;
the network of their code (github.com/Qualcomm-AI-research/BayesianBits,
``benchmarks/image_net/models/mnist_models.py``, ``LeNet5Quantized``):
32C5 - ReLU - MP2 - 64C5 - ReLU - MP2 - 512FC - ReLU - 10FC (softmax in the loss).
Unpadded 5x5 convolutions with bias, no batch normalisation; on 28x28 inputs the
features are 64 x 4 x 4 = 1024. 582,026 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model


class LeNet5(nn.Module):
    qbench_first_last = ("features.0", "classifier.2")

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs inputs of at least 16x16, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * side * side, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten, not view: channels_last inputs flatten in the same (C, H, W) order
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """LeNet-5 of Bayesian Bits (MNIST): 32C5-MP2-64C5-MP2-512FC, 0.58M parameters."""
    return LeNet5(num_classes, in_channels, image_size)
