"""Large image datasets: files read by DataLoader workers, JPEG decoded on the GPU.

:class:`ImageFileSplit` has the same ``batches(...)`` as
:class:`~qbench.harness.data.base.TensorSplit`. Per batch:

* on CUDA, the workers only read the files' bytes (into pinned memory); the main
  process decodes the whole batch with ``torchvision.io.decode_jpeg(device='cuda')``
  (nvJPEG), falling back to the CPU for files nvJPEG refuses (PNG, CMYK JPEG), then
  crops, resizes, flips and normalises on the GPU;
* on the CPU, the workers decode, crop and resize (uint8), and the main process
  normalises.

Transforms (the standard ImageNet recipe of torchvision's reference scripts and the
papers): training, ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` and a
horizontal flip; evaluation, resize of the short side to ``resize`` then a centre crop of
``size``; bilinear with antialiasing. Every random number of an epoch is drawn from the
caller's generator up front and travels with the sample index, so a run is reproducible
whatever the number of workers or the device.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ..errors import QbenchError

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def resized_crop_params(h: int, w: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering 8-100% of the area with an
    aspect ratio in [3/4, 4/3] (log-uniform); ten tries, then a centre crop."""
    area = h * w
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        ar = math.exp(rng.uniform(lo, hi))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    ratio = w / h
    if ratio < RATIO[0]:
        cw, ch = w, int(round(w / RATIO[0]))
    elif ratio > RATIO[1]:
        ch, cw = h, int(round(h * RATIO[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _eval_geometry(h: int, w: int, resize: int) -> tuple[int, int]:
    """Size after resizing the short side to ``resize``."""
    if h <= w:
        return resize, max(1, int(resize * w / h))
    return max(1, int(resize * h / w)), resize


def _center(h: int, w: int, size: int) -> tuple[int, int]:
    return max(0, (h - size) // 2), max(0, (w - size) // 2)


def transform_uint8(img: torch.Tensor, train: bool, seed: int, size: int, resize: int) -> torch.Tensor:
    """CPU path: one decoded uint8 image [3, H, W] -> [3, size, size] uint8."""
    h, w = img.shape[-2:]
    if train:
        rng = random.Random(seed)
        top, left, ch, cw = resized_crop_params(h, w, rng)
        out = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
        return out.flip(-1) if rng.random() < 0.5 else out
    nh, nw = _eval_geometry(h, w, resize)
    out = TF.resize(img, [nh, nw], antialias=True)
    top, left = _center(nh, nw, size)
    return out[:, top : top + size, left : left + size]


def transform_float(img: torch.Tensor, train: bool, seed: int, size: int, resize: int) -> torch.Tensor:
    """GPU path: the same geometry as :func:`transform_uint8` on a float image (0..255)."""
    h, w = img.shape[-2:]
    x = img.unsqueeze(0).float()
    if train:
        rng = random.Random(seed)
        top, left, ch, cw = resized_crop_params(h, w, rng)
        x = F.interpolate(
            x[..., top : top + ch, left : left + cw],
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return (x.flip(-1) if rng.random() < 0.5 else x)[0]
    nh, nw = _eval_geometry(h, w, resize)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = _center(nh, nw, size)
    return x[0, :, top : top + size, left : left + size]


def _read(path: Path) -> torch.Tensor:
    try:
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    except OSError as e:
        raise QbenchError(f"cannot read image ({e})", str(path)) from None


def _decode_cpu(data: torch.Tensor, name: str) -> torch.Tensor:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise QbenchError(f"cannot decode image ({e}); the file is damaged", name) from None


class _Files(Dataset):
    """Items are (index, seed) pairs; returns bytes (GPU decode) or a transformed image."""

    def __init__(
        self,
        files: list[Path],
        labels: torch.Tensor,
        decode_here: bool,
        train: bool,
        size: int,
        resize: int,
    ):
        self.files, self.labels = files, labels
        self.decode_here, self.train, self.size, self.resize = decode_here, train, size, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        data = _read(self.files[i])
        if not self.decode_here:
            return data, int(self.labels[i]), seed, i
        img = _decode_cpu(data, str(self.files[i]))
        return (
            transform_uint8(img, self.train, seed, self.size, self.resize),
            int(self.labels[i]),
            seed,
            i,
        )


def _collate_bytes(batch):
    return (
        [b[0] for b in batch],
        torch.tensor([b[1] for b in batch]),
        [b[2] for b in batch],
        [b[3] for b in batch],
    )


def _collate_images(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), None, None


class ImageFileSplit:
    """A split of image files with labels, streamed from disk per batch."""

    def __init__(
        self,
        files: list[Path],
        labels: list[int] | torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        size: int = 224,
        resize: int = 256,
        num_workers: int | None = None,
        decode: str = "auto",
    ):
        if decode not in ("auto", "gpu", "cpu"):
            raise QbenchError(f"decode must be auto, gpu or cpu, got {decode!r}", "decode")
        self.files = list(files)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.mean, self.std = mean, std
        self.size, self.resize = size, resize
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.decode = decode

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices) -> ImageFileSplit:
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        return ImageFileSplit(
            [self.files[i] for i in idx],
            self.labels[idx],
            self.mean,
            self.std,
            self.size,
            self.resize,
            self.num_workers,
            self.decode,
        )

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
        gpu = device.type == "cuda" and self.decode != "cpu"
        n = len(self)
        if train:
            order = torch.randperm(n, generator=generator).tolist()
            seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
        else:
            order, seeds = list(range(n)), [0] * n
        ds = _Files(self.files, self.labels, not gpu, train, self.size, self.resize)
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            sampler=list(zip(order, seeds, strict=False)),
            num_workers=self.num_workers,
            collate_fn=_collate_bytes if gpu else _collate_images,
            pin_memory=device.type == "cuda",
            drop_last=drop_last and n >= batch_size,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )
        std = torch.tensor(self.std, dtype=torch.float32)
        scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device)
        shift = (-torch.tensor(self.mean, dtype=torch.float32) / std).view(1, -1, 1, 1).to(device)
        for data, labels, bseeds, idx in loader:
            if gpu:
                images = self._decode_gpu(data, idx, device)
                x = torch.stack(
                    [
                        transform_float(img, train, s, self.size, self.resize)
                        for img, s in zip(images, bseeds, strict=False)
                    ]
                )
                x = x.mul_(scale).add_(shift)
            else:
                x = torch.addcmul(shift, data.to(device, non_blocking=True).float(), scale)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels.to(device, non_blocking=True)

    def _decode_gpu(self, data: list[torch.Tensor], idx: list[int], device: torch.device) -> list[torch.Tensor]:
        jpeg = [bytes(d[:2].tolist()) == b"\xff\xd8" for d in data]
        out: list[torch.Tensor | None] = [None] * len(data)
        js = [i for i, j in enumerate(jpeg) if j]
        if js:
            try:
                dec = decode_jpeg([data[i] for i in js], mode=ImageReadMode.RGB, device=device)
                for i, img in zip(js, dec, strict=False):
                    out[i] = img
            except RuntimeError:
                pass  # one file nvJPEG refuses: the CPU decodes what is left
        for i, img in enumerate(out):
            if img is None:
                out[i] = _decode_cpu(data[i], str(self.files[idx[i]])).to(device, non_blocking=True)
        return out  # type: ignore[return-value]
