"""The shapes every dataset returns: a bundle of named splits and how to batch them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import QbenchError


@dataclass
class TensorSplit:
    """A split held in memory as uint8 images [N, C, H, W] and int64 labels [N].

    ``batches`` moves the whole split to ``device`` once (cached), then per batch
    converts to float, normalises and (when ``train``) augments on that device:
    random crop with ``pad`` pixels of zero padding and horizontal flips, as the
    CIFAR recipes do. No DataLoader workers are involved.

    The random numbers of a whole epoch (order, crop offsets, flips) are drawn at once
    from ``generator`` (a CPU generator, so runs are reproducible on any device) and
    copied to the device once per epoch, not once per batch. The crop pads the uint8
    image with zeros (black) before normalising, as torchvision's
    ``RandomCrop(padding=4)`` on the PIL image does in the usual CIFAR pipeline.
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

    def subset(self, indices: torch.Tensor) -> TensorSplit:
        """A split holding only ``indices`` (same normalisation and augmentation)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorSplit(self.images[idx], self.labels[idx], self.mean, self.std, self.pad, self.flip)

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
        device = torch.device(device)
        images, labels = self._device_copy(device)
        n = len(self)
        # x_norm = (x/255 - mean)/std = x * scale + shift, one fused multiply-add per pixel
        std = torch.tensor(self.std, dtype=torch.float32)
        scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device)
        shift = (-torch.tensor(self.mean, dtype=torch.float32) / std).view(1, -1, 1, 1).to(device)
        augmenting = train and bool(self.pad or self.flip)
        if train:
            order = torch.randperm(n, generator=generator).to(device)
        if augmenting:  # drawn only when used, so unaugmented splits keep their random stream
            jitter = torch.randint(0, 2 * self.pad + 1, (2, n), generator=generator).to(device)
            flips = (torch.rand(n, generator=generator) < 0.5).to(device)
        if not train:
            order = torch.arange(n, device=device)
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            if augmenting:
                sl = slice(start, start + batch_size)
                x = crop_flip(x, self.pad, jitter[0, sl], jitter[1, sl], flips[sl] if self.flip else None)
            x = torch.addcmul(shift, x.float(), scale)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels[idx]


def crop_flip(
    x: torch.Tensor,
    pad: int,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor | None,
) -> torch.Tensor:
    """Per-image random crop (zero padding of ``pad`` pixels, offsets ``dy``/``dx`` in
    ``[0, 2 pad]``) and horizontal flip where ``flip`` is True; any dtype, on x's device.

    One gather for the whole batch: the crop and the flip are both index maps.
    """
    n, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).view(1, h) + dy.view(n, 1)  # [n, h] in padded coords
    cols = torch.arange(w, device=dev).view(1, w)
    if flip is not None:
        cols = torch.where(flip.view(n, 1), (w - 1) - cols, cols)  # mirror before the shift
    cols = cols + dx.view(n, 1)  # [n, w]
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    batch = torch.arange(n, device=dev).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2)


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, on x's device."""
    n = x.shape[0]
    jitter = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    mask = (torch.rand(n, generator=generator) < 0.5).to(x.device) if flip else None
    return crop_flip(x, pad, jitter[0], jitter[1], mask).contiguous()


def limited(split: TensorSplit, limit: int | None) -> TensorSplit:
    """A fixed random subset of ``limit`` images (seed 0, kept in file order), or the split
    itself; for quick runs and tests on a slice of a real dataset."""
    if not limit or limit >= len(split):
        return split
    g = torch.Generator().manual_seed(0)
    return split.subset(torch.randperm(len(split), generator=g)[: int(limit)].sort().values)


class MissingSplit:
    """Stands for a split whose files are absent (e.g. ImageNet with only ``val/``):
    evaluation-only cells work; anything that reads this split gets a clear error."""

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where

    def __len__(self) -> int:
        raise QbenchError(self.message, self.where)

    def batches(self, *args, **kwargs):
        raise QbenchError(self.message, self.where)

    def __bool__(self) -> bool:  # ``if bundle.val:`` style checks must not raise
        return False


@dataclass
class DataBundle:
    """A dataset ready for training: named splits plus what a model needs to know.

    ``splits`` has ``train`` and ``test`` and, where the dataset defines one, ``val``
    (model selection uses ``val`` when present; the reported number is always the
    final epoch's on ``test``). A split is a :class:`TensorSplit` or any object with
    the same ``batches(...)`` and ``__len__``.

    ``variant`` names the form the data was read in where a dataset has several
    (``cifar10``: ``pickle`` for the original batches, ``jpeg`` for an ImageFolder of
    JPEG files), because accuracy differs between them; ``description`` says where it
    was read from.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    splits: dict
    class_names: list[str] | None = None
    description: str = ""
    variant: str = ""

    @property
    def train(self):
        return self.splits["train"]

    @property
    def test(self):
        return self.splits["test"]

    @property
    def val(self):
        return self.splits.get("val")

    def fingerprint(self) -> str:
        """SHA-256 of exactly what the splits hold: per split (by name) its decoded uint8
        images and labels and its normalisation, or for a split streamed from files its file
        names and labels (a file rewritten in place keeps its name: the name list is what is
        checked there); a missing split counts as missing. Two runs with the same
        fingerprint read the same data."""
        import hashlib

        h = hashlib.sha256(f"{self.name}|{self.variant}|{self.num_classes}".encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            if isinstance(split, MissingSplit):
                h.update(f"|{name}:missing".encode())
                continue
            h.update(f"|{name}:{type(split).__name__}:{len(split)}".encode())
            if isinstance(split, TensorSplit):
                h.update(split.images.contiguous().numpy().tobytes())
                h.update(split.labels.to(torch.int64).contiguous().numpy().tobytes())
                h.update(repr((split.mean, split.std, split.pad, split.flip)).encode())
            elif hasattr(split, "files") and hasattr(split, "labels"):
                for f, y in zip(split.files, torch.as_tensor(split.labels).tolist(), strict=True):
                    h.update(f"{Path(f).parent.name}/{Path(f).name}:{y}\n".encode())
        return h.hexdigest()
