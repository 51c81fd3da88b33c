"""Digit scenes: a small, real detection and instance-segmentation workload built from digits.

Each image is a black canvas (``canvas`` x ``canvas`` pixels, 128 by default) with 1 to
``max_digits`` real handwritten digits pasted on it, each rescaled to a random side of
``min_side``..``max_side`` pixels, in squares that do not overlap. A digit's instance
mask is its stroke: the pixels of the rescaled digit at or above ``threshold`` (of 255);
its box is the exact bounding box of that mask; its category is the digit's class
(COCO category ids 1..10 for the digits 0..9, named ``"0"`` .. ``"9"``). Masks are stored
as COCO RLE (``pycocotools.mask.encode``), areas are mask pixel counts.

Digits come from the MNIST test split (the IDX files ``t10k-images-idx3-ubyte[.gz]`` and
``t10k-labels-idx1-ubyte[.gz]``, looked for where the ``mnist`` dataset looks, or in the
``mnist_path`` option): training scenes use the first 5,000 test digits, validation scenes
the last 5,000, so no digit appears in both. Without them (``source: auto``) scikit-learn's
8x8 digits are used instead (upscaled, first 1,200 for training, the rest for
validation): the dataset's ``variant`` (``mnist`` or ``sklearn``) says which, and it is
part of the cache key and the fingerprint.

Everything is drawn from ``numpy.random.default_rng([seed, split])``, so one seed gives
one dataset, byte for byte. The scenes are written once in COCO's official layout
(``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``, PNG
images) to a folder of the cache (see :mod:`qbench.harness.data.cache`) and read back
with :class:`~qbench.harness.data.coco.CocoDetection`; building 400 + 100 scenes takes a
second or two.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import encode_png, write_file

from ..errors import QbenchError
from .cache import cache_root, default_data_root, fingerprint

FORMAT = 1  # bump when the generated scenes change for the same parameters


@dataclass(frozen=True)
class SceneConfig:
    """What a digit-scenes dataset is made of (every field is part of its cache key)."""

    seed: int = 0
    train_images: int = 400
    val_images: int = 100
    canvas: int = 128
    min_digits: int = 1
    max_digits: int = 4
    min_side: int = 20
    max_side: int = 48
    threshold: int = 128

    def check(self, where: str) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise QbenchError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}", where)
        if not 8 <= self.min_side <= self.max_side <= self.canvas:
            raise QbenchError(
                f"need 8 <= min_side <= max_side <= canvas, got {self.min_side}, {self.max_side}, {self.canvas}", where
            )
        if (self.max_digits * self.max_side**2) > 0.6 * self.canvas**2:
            raise QbenchError(
                f"{self.max_digits} digits of up to {self.max_side} px do not fit a {self.canvas} px canvas "
                "without overlap; lower max_digits or max_side, or raise canvas",
                where,
            )
        if self.train_images < 1 or self.val_images < 1:
            raise QbenchError("train_images and val_images must be at least 1", where)
        if not 1 <= self.threshold <= 255:
            raise QbenchError(f"threshold must be in 1..255, got {self.threshold}", where)


@dataclass
class DigitSource:
    """The digits scenes are cut from: uint8 images [N, h, w] and labels, split into two pools."""

    variant: str  # "mnist" or "sklearn"
    images: np.ndarray
    labels: np.ndarray
    pools: dict[str, np.ndarray]
    files: list[Path]
    description: str


def mnist_source(dirs: list[Path]) -> DigitSource | None:
    """The MNIST test split from the first folder of ``dirs`` that has it, or None."""
    from .mnist import FILES, _find, read_idx

    img_stem, lab_stem = FILES["test"]
    for d in dirs:
        pi, pl = _find([d], img_stem), _find([d], lab_stem)
        if pi and pl:
            images, labels = read_idx(pi), read_idx(pl).astype(np.int64)
            n = len(labels)
            pools = {"train": np.arange(0, n // 2), "val": np.arange(n // 2, n)}
            return DigitSource("mnist", images, labels, pools, [pi, pl], f"MNIST test split digits from {d}")
    return None


def sklearn_source() -> DigitSource:
    """scikit-learn's 1,797 8x8 digits (values 0..16 stored as 0..240)."""
    import sklearn
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * 15).round().astype(np.uint8)
    labels = data.target.astype(np.int64)
    pools = {"train": np.arange(0, 1200), "val": np.arange(1200, len(labels))}
    desc = f"scikit-learn {sklearn.__version__} 8x8 digits, upscaled"
    return DigitSource("sklearn", images, labels, pools, [], desc)


def find_source(source: str, mnist_path: str | None, root: str | None, where: str) -> DigitSource:
    """The digits for ``source`` (``auto``, ``mnist`` or ``sklearn``)."""
    if source not in ("auto", "mnist", "sklearn"):
        raise QbenchError(f"source must be auto, mnist or sklearn, got {source!r}", where)
    if source == "sklearn":
        return sklearn_source()
    base = Path(root).expanduser() if root else default_data_root()
    dirs = (
        [Path(mnist_path).expanduser()]
        if mnist_path
        else [base / "MNIST" / "raw", base / "mnist", base / "MNIST", base]
    )
    found = mnist_source(dirs)
    if found is not None:
        return found
    if source == "mnist":
        raise QbenchError(
            "MNIST test split not found: put t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in "
            f"{dirs[0]} (looked in {', '.join(str(d) for d in dirs)}), or use source: sklearn",
            where,
        )
    return sklearn_source()


def _place(rng: np.random.Generator, sides: list[int], canvas: int) -> list[tuple[int, int]] | None:
    """Top-left corners of non-overlapping squares of ``sides``, or None (caller retries)."""
    placed: list[tuple[int, int, int]] = []
    for s in sides:
        for _ in range(50):
            y, x = (int(v) for v in rng.integers(0, canvas - s + 1, size=2))
            if all(y + s <= py or py + ps <= y or x + s <= px or px + ps <= x for py, px, ps in placed):
                placed.append((y, x, s))
                break
        else:
            return None
    return [(y, x) for y, x, _ in placed]


def _rescale(digit: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(digit.astype(np.float32))[None, None]
    out = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False, antialias=side < digit.shape[0])
    return out[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def make_scene(rng: np.random.Generator, src: DigitSource, pool: np.ndarray, cfg: SceneConfig):
    """One scene: the uint8 image [canvas, canvas] and its instances (label, box xyxy, mask)."""
    while True:
        k = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
        sides = sorted((int(s) for s in rng.integers(cfg.min_side, cfg.max_side + 1, size=k)), reverse=True)
        corners = _place(rng, sides, cfg.canvas)
        if corners is not None:
            break
    picks = rng.choice(pool, size=k, replace=False)
    image = np.zeros((cfg.canvas, cfg.canvas), dtype=np.uint8)
    instances = []
    for idx, side, (y, x) in zip(picks, sides, corners, strict=True):
        patch = _rescale(src.images[idx], side)
        image[y : y + side, x : x + side] = patch
        mask = np.zeros_like(image)
        mask[y : y + side, x : x + side] = patch >= cfg.threshold
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:  # a digit too faint to leave a stroke: no instance
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        instances.append((int(src.labels[idx]), box, mask))
    return image, instances


def build_split(src: DigitSource, split: str, n: int, cfg: SceneConfig, out: Path) -> dict:
    """Write ``n`` scenes of ``split`` as PNG files under ``out/<split>2017`` and return the
    COCO instances dict."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng([cfg.seed, SPLIT_IDS[split]])
    folder = out / f"{split}2017"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        image, instances = make_scene(rng, src, src.pools[split], cfg)
        name = f"{i:06d}.png"
        write_file(str(folder / name), encode_png(torch.from_numpy(image)[None]))
        images.append({"id": i + 1, "file_name": name, "height": cfg.canvas, "width": cfg.canvas})
        for label, (x1, y1, x2, y2), mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                }
            )
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    info = {"description": f"qbench digit scenes ({src.variant}), {split}", "qbench_config": asdict(cfg)}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


SPLIT_IDS = {"train": 0, "val": 1}


def scene_key(src: DigitSource, cfg: SceneConfig) -> str:
    """The cache folder's name: the source, its files' fingerprint and every parameter."""
    src_fp = fingerprint(src.files) if src.files else src.description
    h = hashlib.sha1(f"v{FORMAT}|{src.variant}|{src_fp}|{json.dumps(asdict(cfg), sort_keys=True)}".encode())
    return f"digit_scenes-{src.variant}-s{cfg.seed}-{h.hexdigest()[:12]}"


def build_scenes(src: DigitSource, cfg: SceneConfig, cache_dir: str | Path | None = None) -> Path:
    """The folder (COCO's official layout) holding the scenes of ``cfg``: built on first use,
    atomically (a killed build leaves nothing half-written), then reused."""
    final = cache_root(cache_dir) / "detection" / scene_key(src, cfg)
    if (final / "annotations" / "instances_val2017.json").is_file():
        return final
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "annotations").mkdir(parents=True)
        for split, n in (("train", cfg.train_images), ("val", cfg.val_images)):
            data = build_split(src, split, n, cfg, tmp)
            (tmp / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same folder first
            if not (final / "annotations" / "instances_val2017.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = [
    "DigitSource",
    "SceneConfig",
    "build_scenes",
    "find_source",
    "make_scene",
    "mnist_source",
    "scene_key",
    "sklearn_source",
]
