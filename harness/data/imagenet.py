"""ImageNet (ILSVRC-2012): ImageFolder ``train/`` and ``val/``, 1000 classes.

Files: ``train/<synset>/<image>.JPEG`` and ``val/<synset>/<image>.JPEG`` (the usual
layout after sorting the validation images into class folders), as folders or as
``train.tar.gz`` / ``val.tar.gz`` archives (unpacked once into the cache folder), in
the ``path`` option, else ``<root>/imagenet``, else ``<root>``. ``val`` is the test split
(the papers report ImageNet validation accuracy). A missing ``train`` is a
:class:`~qbench.harness.data.base.MissingSplit`: released models can still be evaluated.

Class indices: when a synset list is present (the ``synsets`` option, or
``synsets.txt`` / ``LOC_synset_mapping.txt`` beside the splits; one synset a line,
index = line number), folders are mapped to their canonical index, so a subset of the
classes (such as a 500-image sample) keeps the indices a released model expects.
Without one, the sorted folder names are the classes (for the full ImageNet this is the
canonical order).

Transforms: the standard 224 recipe (random resized crop + flip for training; resize
256, centre crop 224 for evaluation), normalised with ImageNet's mean and std; JPEG
decoded on the GPU (see :mod:`qbench.harness.data.streamed`).
"""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path

from ..errors import QbenchError
from . import register_dataset
from .base import DataBundle, MissingSplit
from .cache import cache_root, fingerprint
from .folders import class_indices, find_split, is_archive, list_folder
from .streamed import ImageFileSplit

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SYNSET_FILES = ("synsets.txt", "LOC_synset_mapping.txt")


def read_synsets(path: Path) -> list[str]:
    """One synset per line (the first word of the line), index = line number."""
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise QbenchError("synset list has duplicates", str(path))
    return names


def _extract(archive: Path, cache_dir) -> Path:
    """Unpack ``archive`` once into the cache folder; returns the unpacked folder."""
    dest = cache_root(cache_dir) / f"extract-{archive.name.split('.')[0]}-{fingerprint([archive])}"
    done = dest / ".complete"
    if done.exists():
        return dest
    tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            try:
                tf.extractall(tmp, filter="data")  # refuses absolute paths and links out
            except TypeError:  # Python without extraction filters
                for m in tf.getmembers():
                    if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts:
                        raise QbenchError(f"unsafe member path {m.name}", str(archive)) from None
                tf.extractall(tmp)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise QbenchError(
            f"archive is corrupt or truncated ({type(e).__name__}: {e}); copy it again",
            str(archive),
        ) from None
    (tmp / ".complete").touch()
    if dest.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def _split_folder(base: Path, split: str, cache_dir) -> tuple[Path | None, list[Path]]:
    """The split's folder (unpacking an archive if that is what is there), plus folders
    where a synset list may sit."""
    src = find_split(base, split)
    if src is None:
        return None, []
    if not is_archive(src):
        return src, []
    out = _extract(src, cache_dir)
    inner = out / split
    return (inner if inner.is_dir() else out), [out]


@register_dataset("imagenet", shape=(1000, 3, 224))
def imagenet(
    root: str | None = None,
    *,
    path: str | None = None,
    synsets: str | None = None,
    image_size: int = 224,
    resize: int = 256,
    num_workers: int | None = None,
    decode: str = "auto",
    cache_dir: str | None = None,
    limit: int | None = None,
) -> DataBundle:
    """ImageNet ILSVRC-2012, ImageFolder train/ and val/, 224 crops, JPEG decoded on the GPU."""
    if path:
        base = Path(path).expanduser()
    elif root:
        base = Path(root).expanduser() / "imagenet"
        if not base.is_dir():
            base = Path(root).expanduser()
    else:
        raise QbenchError(
            "imagenet needs --data-root (holding imagenet/train and imagenet/val) or a path option",
            "imagenet",
        )
    train_dir, extra_t = _split_folder(base, "train", cache_dir)
    val_dir, extra_v = _split_folder(base, "val", cache_dir)
    if train_dir is None and val_dir is None:
        raise QbenchError(
            f"ImageNet not found: put ImageFolder train/<synset>/*.JPEG and val/<synset>/*.JPEG "
            f"(or train.tar.gz / val.tar.gz) in {base}",
            "imagenet",
        )
    canonical = None
    syn_path = Path(synsets).expanduser() if synsets else None
    if syn_path is None:
        for d in [base, *extra_t, *extra_v]:
            for name in SYNSET_FILES:
                if (d / name).is_file():
                    syn_path = syn_path or d / name
    if syn_path is not None:
        if not syn_path.is_file():
            raise QbenchError(f"{syn_path} does not exist", "imagenet.synsets")
        canonical = read_synsets(syn_path)

    listed = {s: list_folder(d) for s, d in (("train", train_dir), ("test", val_dir)) if d is not None}
    for s, items in listed.items():
        if not items:
            raise QbenchError(
                "no images found: expected <synset>/<image>.JPEG entries",
                str(train_dir if s == "train" else val_dir),
            )
    names_for_classes = [c for c, _ in listed.get("train") or listed["test"]]
    mapping, classes = class_indices(names_for_classes, canonical, str(syn_path or base))
    splits: dict = {}
    for s, items in listed.items():
        unknown = sorted({c for c, _ in items} - set(mapping))
        if unknown:
            raise QbenchError(f"class folders {unknown[:5]} are not in the training classes", s)
        split = ImageFileSplit(
            [p for _, p in items],
            [mapping[c] for c, _ in items],
            MEAN,
            STD,
            image_size,
            resize,
            num_workers,
            decode,
        )
        if limit and limit < len(split):
            import torch

            g = torch.Generator().manual_seed(0)
            split = split.subset(torch.randperm(len(split), generator=g)[:limit].sort().values)
        splits[s] = split
    if "train" not in splits:
        splits["train"] = MissingSplit(
            f"the ImageNet train split is missing: put train/<synset>/*.JPEG (or train.tar.gz) in {base}",
            "imagenet",
        )
    if "test" not in splits:
        splits["test"] = MissingSplit(
            f"the ImageNet val split is missing: put val/<synset>/*.JPEG (or val.tar.gz) in {base}",
            "imagenet",
        )
    return DataBundle(
        name="imagenet",
        num_classes=len(classes),
        in_channels=3,
        image_size=image_size,
        splits=splits,
        class_names=classes,
        description=(
            f"ImageNet ImageFolder from {base} (train: {len(listed.get('train', []))} images, "
            f"val: {len(listed.get('test', []))} images, classes "
            + (f"indexed by {syn_path.name}" if canonical else "in sorted folder order")
            + f"); {image_size} crops, JPEG decoded on the GPU"
        ),
        variant="imagefolder",
    )
