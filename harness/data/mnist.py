"""MNIST (LeCun et al. 1998): 60,000 training and 10,000 test images, 28x28 grey.

Files: the original IDX files, gzipped or not, named as LeCun's site and torchvision
name them (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``), looked for in the
``path`` option, else in ``<root>/MNIST/raw`` (torchvision's layout), ``<root>/mnist``,
``<root>/MNIST`` and ``<root>``. When they are missing and ``download`` is on (the
default), torchvision downloads them into ``<root>/MNIST/raw``. A split whose files are
absent (the shared test data holds only the test split) is a
:class:`~qbench.harness.data.base.MissingSplit`: evaluation works, training says what to
put where.

Preprocessing as Bayesian Bits' MNIST loader and the PyTorch examples: scale to [0, 1],
normalise with mean 0.1307 and std 0.3081, no augmentation. Decoded once and cached as
a uint8 tensor file (see :mod:`qbench.harness.data.cache`).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import QbenchError
from . import register_dataset
from .base import DataBundle, MissingSplit, TensorSplit, limited
from .cache import cached_tensors, default_data_root

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MEAN, STD = (0.1307,), (0.3081,)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (unsigned bytes) as an array; a damaged file raises a QbenchError."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise QbenchError(f"cannot read the IDX file ({type(e).__name__}: {e}); copy it again", str(path)) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise QbenchError("not an IDX file of unsigned bytes (bad magic number)", str(path))
    ndim = raw[3]
    head = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    body = raw[head:]
    if len(body) != int(np.prod(dims)):
        raise QbenchError(
            f"IDX file is truncated: header says {dims} ({int(np.prod(dims))} bytes), "
            f"found {len(body)} bytes; copy it again",
            str(path),
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def _locate(dirs: list[Path]) -> dict[str, tuple[Path, Path] | None]:
    out = {}
    for split, (img, lab) in FILES.items():
        pi, pl = _find(dirs, img), _find(dirs, lab)
        out[split] = (pi, pl) if pi and pl else None
    return out


def _download(root: Path) -> str:
    """Download with torchvision into ``root/MNIST/raw``; returns '' or why it failed."""
    try:
        from torchvision.datasets import MNIST

        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
        return ""
    except Exception as e:  # offline, read-only root, server down
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]  # one line for the CLI


def _load_split(paths: tuple[Path, Path]) -> dict:
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise QbenchError(f"images {images.shape} and labels {labels.shape} do not match", str(paths[0].parent))
    if labels.max(initial=0) > 9:
        raise QbenchError("labels outside 0..9", str(paths[1]))
    return {
        "images": torch.from_numpy(images.copy()).unsqueeze(1),
        "labels": torch.from_numpy(labels.astype(np.int64)),
    }


@register_dataset("mnist", shape=(10, 1, 28))
def mnist(
    root: str | None = None,
    *,
    path: str | None = None,
    download: bool = True,
    cache: bool = True,
    cache_dir: str | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DataBundle:
    """MNIST, 28x28 grey, 60k/10k (IDX files; downloaded when online). ``mean``/``std``
    replace the normalisation (``mean: [0], std: [1]``: pixels in [0, 1], ``ToTensor`` only)."""
    for key, v in (("mean", mean), ("std", std)):
        if v is not None and (len(v) != 1 or (key == "std" and not v[0] > 0)):
            raise QbenchError(
                f"{key} must be one number{' above 0' if key == 'std' else ''}, got {v!r}", f"mnist.{key}"
            )
    norm_mean, norm_std = tuple(mean or MEAN), tuple(std or STD)
    base = Path(root).expanduser() if root else default_data_root()
    dirs = [Path(path).expanduser()] if path else [base / "MNIST" / "raw", base / "mnist", base / "MNIST", base]
    found = _locate(dirs)
    why = ""
    if download and not path and not all(found.values()):
        why = _download(base)
        found = _locate(dirs)
    where = ", ".join(str(d) for d in dirs)
    if not any(found.values()):
        raise QbenchError(
            "MNIST files not found: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in {dirs[0]}"
            + (f" (download failed: {why})" if why else ""),
            "mnist",
        )
    splits: dict = {}
    for split, paths in found.items():
        if paths is None:
            img, lab = FILES[split]
            splits[split] = MissingSplit(
                f"the MNIST {split} split is missing: put {img}.gz and {lab}.gz in {dirs[0]} "
                f"(looked in {where})" + (f"; download failed: {why}" if why else ""),
                "mnist",
            )
            continue
        data = cached_tensors(f"mnist-{split}", paths, lambda p=paths: _load_split(p), cache_dir, cache)
        ts = TensorSplit(data["images"], data["labels"], norm_mean, norm_std)
        splits[split] = limited(ts, limit if split == "train" else (test_limit or limit))
    src = next(p for p in found.values() if p)[0].parent
    return DataBundle(
        name="mnist",
        num_classes=10,
        in_channels=1,
        image_size=28,
        splits=splits,
        class_names=[str(i) for i in range(10)],
        description=f"MNIST IDX files from {src}; normalised ({norm_mean[0]:g}, {norm_std[0]:g}), no augmentation",
        variant="idx",
    )
