"""A small CNN for the embedded default (8x8 digits) and other tiny inputs.

conv(32) - BN - ReLU - conv(64) - BN - ReLU - maxpool - conv(128) - BN - ReLU - global
average pool - linear. About 95k parameters; it trains to ~98-99% on digits in seconds
on a CPU.
"""

from __future__ import annotations

from torch import nn

from . import register_model


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(in_channels, w),
            *_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


@register_model("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, image_size: int = 8, width: int = 32) -> nn.Module:
    """Small CNN for tiny inputs (digits): 3 conv-BN-ReLU blocks of width w, 2w, 4w, then linear."""
    return SmallCNN(num_classes, in_channels, width)
