"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018), torchvision's implementation, as APoT quantizes it.

Options: ``weights`` (a file path, or torchvision's ``DEFAULT`` / ``IMAGENET1K_V1`` /
``IMAGENET1K_V2`` from the torch hub cache) and ``width_mult``. 3.50M parameters at 1000
classes. On inputs below 64x64 the first convolution uses stride 1 (as CIFAR
adaptations do), since five stride-2 stages would leave a 1x1 map of a 32x32 image.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from . import register_model
from .weights import apply_weights


@register_model("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    weights: str | None = None,
    width_mult: float = 1.0,
    dropout: float = 0.2,
) -> nn.Module:
    """MobileNetV2, torchvision's (3.5M parameters); weights from a file or the hub cache."""
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult, dropout=dropout)
    first = model.features[0][0]
    if in_channels != 3 or image_size < 64:
        stride = 1 if image_size < 64 else 2
        model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=stride, padding=1, bias=False)
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    model.qbench_first_last = ("features.0.0", "classifier.1")
    return apply_weights(
        model,
        weights,
        tvm.mobilenet_v2,
        "mobilenet_v2.weights",
        may_differ=("classifier.1.", "features.0.0."),
    )
