"""COCO-format detection and instance-segmentation data (Lin et al. 2014), read with pycocotools.

A COCO-format dataset is a folder of images plus one instances JSON per split. The
official layout is::

    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json
    <root>/train2017/*.jpg
    <root>/val2017/*.jpg

:class:`CocoDetection` serves one split as torchvision's detection models want it: an
image tensor ``[3, H, W]`` (float in [0, 1], RGB) and a target dict with ``boxes``
(float ``[N, 4]``, ``x1, y1, x2, y2`` in pixels), ``labels`` (int64 ``[N]``, contiguous
1..K in the order of the sorted category ids; 0 is left for the background), ``masks``
(uint8 ``[N, H, W]``, only when ``masks=True`` and every annotation has a segmentation),
``iscrowd``, ``area`` and ``image_id`` (the COCO id). Images have different sizes, so
batches are lists: :func:`collate` turns a list of samples into ``(images, targets)``.

Boxes of zero width or height (they occur in the official files) are dropped, as
torchvision's reference scripts do; crowd annotations are kept and marked in ``iscrowd``
(the training loop leaves them out, COCOeval ignores detections that match them).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from ..errors import QbenchError

#: the official file names of a split
SPLITS = ("train", "val")


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
    except ImportError:  # pragma: no cover - a declared dependency
        raise QbenchError("pycocotools is not installed: pip install 'pycocotools>=2.0.7'", "coco") from None
    return COCO, mask_utils


def coco_from_dict(dataset: dict) -> Any:
    """A ``pycocotools.coco.COCO`` index over an in-memory instances dict (no printing)."""
    COCO, _ = _pycocotools()
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_instances(path: Path, where: str = "coco") -> dict:
    """An instances JSON as a dict; a clear one-line error when absent or malformed."""
    if not path.is_file():
        raise QbenchError(f"annotation file {path} not found", where)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QbenchError(f"cannot read annotation file {path} ({type(e).__name__}: {e})", where) from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if not isinstance(data, dict) or missing:
        raise QbenchError(f"{path} is not a COCO instances file: no list {', '.join(missing)}", where)
    return data


def split_paths(root: str | Path, split: str, year: str = "2017") -> tuple[Path, Path]:
    """(instances JSON, image folder) of ``split`` in the official layout under ``root``."""
    root = Path(root).expanduser()
    return root / "annotations" / f"instances_{split}{year}.json", root / f"{split}{year}"


def locate_split(root: str | Path, split: str, year: str = "2017", where: str = "coco") -> tuple[Path, Path]:
    """:func:`split_paths`, checked: a one-line error naming what is missing and where."""
    ann, images = split_paths(root, split, year)
    missing = [str(p) for p in (ann, images) if not p.exists()]
    if missing:
        raise QbenchError(
            f"COCO {split} split not found: missing {' and '.join(missing)} (expected the official layout "
            f"annotations/instances_{split}{year}.json and {split}{year}/ under {Path(root).expanduser()})",
            where,
        )
    return ann, images


def decode_masks(anns: list[dict], height: int, width: int) -> torch.Tensor:
    """The instance masks of ``anns`` (polygons, RLE or uncompressed RLE) as uint8 [N, H, W]."""
    _, mask_utils = _pycocotools()
    out = np.zeros((len(anns), height, width), dtype=np.uint8)
    for i, a in enumerate(anns):
        seg = a["segmentation"]
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        m = mask_utils.decode(rle)
        out[i] = m if m.ndim == 2 else m.max(axis=2)
    return torch.from_numpy(out)


class CocoDetection(torch.utils.data.Dataset):
    """One split of a COCO-format dataset: ``dataset[i] -> (image, target)``.

    ``annotations`` is the instances JSON (path or already-read dict), ``images`` the
    folder its ``file_name`` entries are relative to. ``masks``: decode the segmentations
    into ``target["masks"]`` (for Mask R-CNN). ``cache_images`` keeps decoded images in
    memory (small datasets).
    """

    def __init__(
        self,
        annotations: str | Path | dict,
        images: str | Path,
        *,
        masks: bool = False,
        cache_images: bool = False,
        where: str = "coco",
    ):
        self.where = where
        data = annotations if isinstance(annotations, dict) else read_instances(Path(annotations), where)
        self.images_dir = Path(images).expanduser()
        if not self.images_dir.is_dir():
            raise QbenchError(f"image folder {self.images_dir} not found", where)
        self.coco = coco_from_dict(data)
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        #: contiguous label (1..K) -> COCO category id, and back
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.cat_to_label = {c: i for i, c in self.label_to_cat.items()}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.cat_ids]
        self.masks = masks
        self._cache: dict[int, torch.Tensor] | None = {} if cache_images else None

    @property
    def num_classes(self) -> int:
        """Number of categories plus one for the background (torchvision's convention)."""
        return len(self.cat_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> torch.Tensor:
        """The decoded image ``index`` as uint8 [3, H, W]."""
        image_id = self.ids[index]
        if self._cache is not None and image_id in self._cache:
            return self._cache[image_id]
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        try:
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            img = decode_image(data, mode=ImageReadMode.RGB)
        except (OSError, RuntimeError) as e:
            raise QbenchError(f"cannot read image {path} ({type(e).__name__}: {e})", self.where) from None
        if self._cache is not None:
            self._cache[image_id] = img
        return img

    def target(self, index: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """The target dict of image ``index`` (see the module docstring)."""
        image_id = self.ids[index]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "image_id": image_id,
        }
        if self.masks:
            if not all("segmentation" in a for a in anns):
                raise QbenchError(f"image {image_id} has annotations without a segmentation (masks asked)", self.where)
            target["masks"] = decode_masks(anns, height, width)
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = self.image(index)
        return img.float().div_(255.0), self.target(index, img.shape[-2], img.shape[-1])


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Variable-size images: a list of images and a list of targets (torchvision's input)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device):
    """Images and the tensors of targets on ``device`` (``image_id`` stays a Python int)."""
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


@dataclass
class DetectionSplit:
    """A :class:`CocoDetection` with the harness's ``batches(...)`` shape: batches of
    ``(images, targets)`` lists on ``device``; training batches are shuffled by
    ``generator`` and, with ``flip``, flipped horizontally (boxes and masks too) per image."""

    dataset: CocoDetection
    flip: bool = False

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def coco(self):
        return self.dataset.coco

    def batches(
        self,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        **_ignored: Any,
    ) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        n = len(self)
        order = torch.randperm(n, generator=generator).tolist() if train else list(range(n))
        flips = (torch.rand(n, generator=generator) < 0.5).tolist() if train and self.flip else [False] * n
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            samples = [
                hflip(*self.dataset[i]) if flips[i] else self.dataset[i] for i in order[start : start + batch_size]
            ]
            yield to_device(*collate(samples), torch.device(device))


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror an image and its boxes and masks left to right."""
    w = image.shape[-1]
    t = dict(target)
    boxes = t["boxes"].clone()
    boxes[:, [0, 2]] = w - t["boxes"][:, [2, 0]]
    t["boxes"] = boxes
    if "masks" in t:
        t["masks"] = t["masks"].flip(-1)
    return image.flip(-1), t


def load_coco(
    root: str | Path, split: str = "val", *, year: str = "2017", masks: bool = False, where: str = "coco"
) -> CocoDetection:
    """The ``split`` (``train`` or ``val``) of a COCO-format dataset in the official layout."""
    if split not in SPLITS:
        raise QbenchError(f"split must be one of {', '.join(SPLITS)}, got {split!r}", where)
    ann, images = locate_split(root, split, year, where)
    return CocoDetection(ann, images, masks=masks, where=where)


__all__ = [
    "CocoDetection",
    "DetectionSplit",
    "coco_from_dict",
    "collate",
    "decode_masks",
    "hflip",
    "load_coco",
    "locate_split",
    "read_instances",
    "split_paths",
    "to_device",
]
