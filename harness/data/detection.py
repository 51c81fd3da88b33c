"""Detection and instance-segmentation datasets: a registry apart from the classification one.

Classification datasets (:func:`qbench.harness.data.load_dataset`) return uint8 tensor
splits of fixed-size images and class labels; detection datasets return lists of
variable-size images with target dicts, so they have their own registry and door,
:func:`load_detection_dataset`, and classification code never meets them.

* ``coco``: a COCO-format dataset in the official layout under ``path`` (or
  ``<data root>/coco``): ``train2017`` is the training split, ``val2017`` the test split;
* ``digit_scenes``: real handwritten digits pasted on canvases (see
  :mod:`qbench.harness.data.digit_scenes`), built once into the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qbench.methods.registry import Registry

from ..errors import QbenchError
from .cache import default_data_root
from .coco import CocoDetection, DetectionSplit, locate_split

DETECTION_DATASETS: Registry[Callable[..., DetectionBundle]] = Registry("detection dataset")


@dataclass
class DetectionBundle:
    """Named splits (``train``, ``test``) of :class:`DetectionSplit`, plus what a detector
    needs: ``num_classes`` counts the background (torchvision's convention), ``label_to_cat``
    maps a model's labels back to COCO category ids for COCOeval."""

    name: str
    num_classes: int
    splits: dict
    class_names: list[str]
    label_to_cat: dict[int, int]
    masks: bool
    description: str = ""
    variant: str = ""
    sources: list[Path] = field(default_factory=list)

    @property
    def train(self) -> DetectionSplit:
        return self.splits["train"]

    @property
    def test(self) -> DetectionSplit:
        return self.splits["test"]

    @property
    def val(self):
        return self.splits.get("val")

    def fingerprint(self) -> str:
        """SHA-256 of the annotation files' bytes and each split's image file names and sizes:
        two runs with the same fingerprint read the same data."""
        h = hashlib.sha256(f"{self.name}|{self.variant}|{self.num_classes}".encode())
        for p in self.sources:
            h.update(Path(p).read_bytes())
        for name in sorted(self.splits):
            ds = self.splits[name].dataset
            h.update(f"|{name}:{len(ds)}".encode())
            for image_id in ds.ids:
                f = ds.images_dir / ds.coco.imgs[image_id]["file_name"]
                h.update(f"{f.name}:{f.stat().st_size}\n".encode())
        return h.hexdigest()


def _bundle(name, variant, description, root: Path, masks: bool, flip: bool, where: str, cache_images: bool):
    splits, sources = {}, []
    for split, files in (("train", "train"), ("test", "val")):
        ann, images = locate_split(root, files, where=where)
        sources.append(ann)
        splits[split] = DetectionSplit(CocoDetection(ann, images, masks=masks, cache_images=cache_images, where=where))
    splits["train"].flip = flip
    test = splits["test"].dataset
    return DetectionBundle(
        name=name,
        num_classes=test.num_classes,
        splits=splits,
        class_names=test.class_names,
        label_to_cat=dict(test.label_to_cat),
        masks=masks,
        description=description,
        variant=variant,
        sources=sources,
    )


@DETECTION_DATASETS.register("coco")
def coco(
    root: str | None = None, *, path: str | None = None, masks: bool = False, flip: bool = True
) -> DetectionBundle:
    """COCO 2017 (or any COCO-format dataset in its layout): train2017 / val2017."""
    base = Path(path).expanduser() if path else (Path(root).expanduser() if root else default_data_root()) / "coco"
    return _bundle("coco", "2017", f"COCO-format data from {base}", base, masks, flip, "coco", cache_images=False)


@DETECTION_DATASETS.register("digit_scenes")
def digit_scenes(
    root: str | None = None,
    *,
    source: str = "auto",
    mnist_path: str | None = None,
    cache_dir: str | None = None,
    masks: bool = True,
    flip: bool = False,
    **scene: int,
) -> DetectionBundle:
    """Handwritten digits pasted on canvases (MNIST test digits, else scikit-learn's 8x8
    digits; ``variant`` says which). ``scene`` options are :class:`SceneConfig` fields."""
    from .digit_scenes import SceneConfig, build_scenes, find_source

    where = "digit_scenes"
    known = set(SceneConfig.__dataclass_fields__)
    unknown = sorted(set(scene) - known)
    if unknown:
        raise QbenchError(
            f"unknown option(s) {', '.join(unknown)}; digit_scenes takes {', '.join(sorted(known))}", where
        )
    cfg = SceneConfig(**{k: int(v) for k, v in scene.items()})
    cfg.check(where)
    src = find_source(source, mnist_path, root, where)
    folder = build_scenes(src, cfg, cache_dir)
    desc = f"{src.description} pasted on {cfg.canvas}px canvases ({asdict(cfg)}), in {folder}"
    # flips would turn digits into mirror images: off by default
    return _bundle(f"digit_scenes[{src.variant}]", src.variant, desc, folder, masks, flip, where, cache_images=True)


def load_detection_dataset(name: str, root: str | None = None, where: str | None = None, **options) -> DetectionBundle:
    """Build the detection dataset ``name``; ``root`` is the data folder (``--data-root``)."""
    return DETECTION_DATASETS.get(name, where)(root, **options)


__all__ = ["DETECTION_DATASETS", "DetectionBundle", "load_detection_dataset"]
