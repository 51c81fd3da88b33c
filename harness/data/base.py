"""The shapes every dataset returns: a bundle of named splits and how to batch them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class TensorSplit:
    """A split held in memory as uint8 images [N, C, H, W] and int64 labels [N].

    ``batches`` moves the whole split to ``device`` once (cached), then per batch
    converts to float, normalises and (when ``train``) augments on that device:
    random crop with ``pad`` pixels of zero padding and horizontal flips, as the
    CIFAR recipes do. No DataLoader workers are involved.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0
    flip: bool = False
    _on: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _device_copy(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on.clear()
            self._on[key] = (self.images.to(device), self.labels.to(device))
        return self._on[key]

    def batches(
        self,
        batch_size: int,
        *,
        train: bool,
        device: torch.device,
        generator: torch.Generator | None = None,
        channels_last: bool = False,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self._device_copy(device)
        n = len(self)
        if train:
            order = torch.randperm(n, generator=generator).to(device)
        else:
            order = torch.arange(n, device=device)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = images[idx].float().div_(255.0).sub_(mean).div_(std)
            if train:
                x = augment(x, self.pad, self.flip, generator)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels[idx]


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, on x's device."""
    n, _, h, w = x.shape
    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # [n, h]
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # [n, w]
        batch = torch.arange(n, device=x.device).view(n, 1, 1)
        # gather [n, h, w] pixel positions for every channel at once
        x = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x.contiguous()


@dataclass
class DataBundle:
    """A dataset ready for training: named splits plus what a model needs to know.

    ``splits`` has ``train`` and ``test`` and, where the dataset defines one, ``val``
    (model selection uses ``val`` when present; the reported number is always the
    final epoch's on ``test``). A split is a :class:`TensorSplit` or any object with
    the same ``batches(...)`` and ``__len__``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    splits: dict
    class_names: list[str] | None = None
    description: str = ""

    @property
    def train(self):
        return self.splits["train"]

    @property
    def test(self):
        return self.splits["test"]

    @property
    def val(self):
        return self.splits.get("val")
