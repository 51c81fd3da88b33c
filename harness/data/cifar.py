"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 50,000 training and 10,000 test images, 32x32.

Two forms, told apart in ``DataBundle.variant`` and ``description`` because accuracy
differs between them:

* ``pickle``: the original python batches in torchvision's layout,
  ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` or
  ``<root>/cifar-100-python/{train,test,meta}``, or the downloaded archive
  ``<root>/cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` read without unpacking;
  downloaded by torchvision when missing and online. The batches are pickles, so they are
  read with a restricted unpickler that builds only what a CIFAR batch holds (dicts, lists,
  strings, numbers and numpy arrays): a file that names any other class or function (a
  crafted "batch" that would run a command) is refused before anything in it runs.
* ``jpeg``: an ImageFolder (``train/<class>/<image>``, ``test/<class>/<image>``) as folders
  or as ``train.tar.gz`` / ``test.tar.gz`` archives, in ``<root>/cifar10-jpeg``
  (``cifar100-jpeg``) or the ``path`` option. Class folders are matched to the canonical
  class names (or named ``0``..``9``), so labels keep CIFAR's class order.

``format: auto`` (the default) takes the ``path`` option's form if given, else the pickle
batches when present, else ``<root>/cifar10-jpeg``, else a root holding ``train``/``test``,
else downloads the pickle batches. ``format: pickle`` or ``format: jpeg`` insists.

Preprocessing (the standard recipe of the ResNet paper and APoT's code): random crop to
32 with 4 pixels of zero padding and horizontal flip for training, done on the GPU per
batch; normalisation with the training set's per-channel mean and standard deviation.
Decoded once and cached as uint8 tensor files (see :mod:`qbench.harness.data.cache`).
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import QbenchError
from . import register_dataset
from .base import DataBundle, TensorSplit, limited
from .cache import cached_tensors, default_data_root
from .folders import ARCHIVE_SUFFIXES, class_indices, decode_all, find_split, read_split

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

SPECS = {
    "cifar10": {
        "classes": CIFAR10_CLASSES,
        "pickle_dir": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "files": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "label_key": "labels",
        "jpeg_dir": "cifar10-jpeg",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "torchvision": "CIFAR10",
    },
    "cifar100": {
        "classes": CIFAR100_CLASSES,
        "pickle_dir": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "files": {"train": ["train"], "test": ["test"]},
        "label_key": "fine_labels",
        "jpeg_dir": "cifar100-jpeg",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "torchvision": "CIFAR100",
    },
}
FORMATS = ("auto", "pickle", "jpeg", "imagefolder")


# -- the pickle batches ------------------------------------------------------------------
def _batch_globals() -> dict[tuple[str, str], object]:
    """The only classes and functions a CIFAR batch's pickle names: numpy's array and dtype
    rebuilders, under numpy 1's (``numpy.core``) and numpy 2's (``numpy._core``) module
    names, and ``_codecs.encode`` (bytes in a protocol-2 pickle written by Python 3).
    Dicts, lists, strings and numbers are pickle opcodes and need no name."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # pickle protocol 5
    return allowed


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _BatchUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :func:`_batch_globals`: anything else (``os.system``,
    ``subprocess.Popen``, ``builtins.eval``...) is refused before it can be called."""

    def __init__(self, file, allowed: dict[tuple[str, str], object]):
        super().__init__(file, encoding="latin1")  # Python 2 pickles, as torchvision reads them
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("a persistent id")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        d = _BatchUnpickler(io.BytesIO(data), _batch_globals()).load()
    except _Refused as e:
        raise QbenchError(
            f"refused: not a CIFAR batch (the pickle names {e.name}, which a CIFAR batch never holds; "
            "nothing in it was run); replace it with the original file",
            where,
        ) from None
    except Exception as e:
        raise QbenchError(f"cannot read the CIFAR batch ({type(e).__name__}: {e}); copy it again", where) from None
    if not isinstance(d, dict):
        raise QbenchError(f"not a CIFAR batch (a pickled {type(d).__name__}, expected a dict)", where)
    # the original batches read with latin1 have str keys; one re-pickled by Python 3 may have bytes keys
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _batch_bytes(source: Path, spec: dict, split: str) -> list[tuple[str, bytes]]:
    names = spec["files"][split]
    if source.is_dir():
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise QbenchError(f"CIFAR batch files {missing} are missing", str(source))
        return [(str(source / n), (source / n).read_bytes()) for n in names]
    wanted = {f"{spec['pickle_dir']}/{n}": n for n in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(source, mode="r:*") as tf:
            for m in tf:
                if m.name in wanted and m.isfile():
                    found[m.name] = tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise QbenchError(
            f"archive is corrupt or truncated ({type(e).__name__}: {e}); copy it again", str(source)
        ) from None
    missing = [n for n in wanted if n not in found]
    if missing:
        raise QbenchError(f"archive lacks {missing}", str(source))
    return [(f"{source}:{n}", found[n]) for n in wanted]


def _load_pickle(source: Path, spec: dict, split: str) -> dict:
    images, labels = [], []
    for where, raw in _batch_bytes(source, spec, split):
        d = _unpickle(raw, where)
        try:
            images.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(d[spec["label_key"]], dtype=np.int64))
        except (KeyError, ValueError, TypeError) as e:
            raise QbenchError(f"not a CIFAR batch ({type(e).__name__}: {e})", where) from None
    return {
        "images": torch.from_numpy(np.concatenate(images)),
        "labels": torch.from_numpy(np.concatenate(labels)),
    }


def _download(name: str, base: Path) -> str:
    try:
        import torchvision.datasets as tvd

        getattr(tvd, SPECS[name]["torchvision"])(str(base), train=True, download=True)
        return ""
    except Exception as e:  # offline, read-only, server down
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]  # one line for the CLI


# -- the JPEG ImageFolder ------------------------------------------------------------------
def _load_folder(source: Path, classes: list[str]) -> dict:
    items = read_split(source)
    mapping, _ = class_indices([c for c, _, _ in items], classes, str(source))
    images = decode_all(items, str(source))
    if tuple(images.shape[1:]) != (3, 32, 32):
        raise QbenchError(f"images are {tuple(images.shape[2:])}, CIFAR's are 32x32", str(source))
    return {
        "images": images,
        "labels": torch.tensor([mapping[c] for c, _, _ in items], dtype=torch.int64),
    }


def _jpeg_base(path: Path) -> bool:
    return find_split(path, "train") is not None or find_split(path, "test") is not None


def _resolve(name: str, base: Path, fmt: str, path: Path | None) -> tuple[str, Path]:
    """(variant, source folder or archive) for ``fmt``; QbenchError when nothing fits."""
    spec = SPECS[name]
    if path is not None:
        if not path.exists():
            raise QbenchError(f"{path} does not exist", f"{name}.path")
        is_pickle = (path / spec["files"]["test"][0]).is_file() or path.name.endswith(ARCHIVE_SUFFIXES)
        if fmt in ("jpeg", "imagefolder") or (fmt == "auto" and not is_pickle):
            return "jpeg", path
        return "pickle", path
    pickle_dir, archive = base / spec["pickle_dir"], base / spec["archive"]
    if fmt in ("auto", "pickle"):
        if pickle_dir.is_dir():
            return "pickle", pickle_dir
        if archive.is_file():
            return "pickle", archive
    if fmt in ("auto", "jpeg", "imagefolder"):
        for cand in (base / spec["jpeg_dir"], base):
            if cand.is_dir() and _jpeg_base(cand):
                return "jpeg", cand
    return "", base


def _load(
    name: str,
    root,
    fmt: str,
    path,
    download: bool,
    cache: bool,
    cache_dir,
    limit,
    test_limit,
    augment: bool,
    mean,
    std,
) -> DataBundle:
    if fmt not in FORMATS:
        raise QbenchError(f"format must be one of {FORMATS}, got {fmt!r}", f"{name}.format")
    spec = SPECS[name]
    base = Path(root).expanduser() if root else default_data_root()
    p = Path(path).expanduser() if path else None
    variant, source = _resolve(name, base, fmt, p)
    why = ""
    if not variant and download and fmt in ("auto", "pickle"):
        why = _download(name, base)
        variant, source = _resolve(name, base, fmt, p)
    if not variant:
        jpeg = f"{base / spec['jpeg_dir']}/{{train,test}}.tar.gz (or train/ and test/ ImageFolder folders)"
        raise QbenchError(
            f"{name} not found: put the python batches in {base / spec['pickle_dir']} "
            f"(or {spec['archive']} in {base}), or a JPEG ImageFolder as {jpeg}"
            + (f"; download failed: {why}" if why else "")
            + (
                f" ({base} is --data-root)"
                if root
                else f" ({base} is the default data folder: pass --data-root DIR or set QBENCH_DATA to look elsewhere)"
            ),
            name,
        )
    classes = spec["classes"]
    splits = {}
    for split in ("train", "test"):
        if variant == "pickle":
            sources = (
                [source] if source.is_file() else [source / f for f in spec["files"][split] if (source / f).exists()]
            )
            data = cached_tensors(
                f"{name}-pickle-{split}",
                sources or [source],
                lambda s=split: _load_pickle(source, spec, s),
                cache_dir,
                cache,
            )
        else:
            src = find_split(source, split)
            if src is None:
                raise QbenchError(
                    f"the {split} split is missing: expected {source}/{split}.tar.gz or {source}/{split}/<class>/*.jpg",
                    name,
                )
            data = cached_tensors(
                f"{name}-jpeg-{split}",
                [src],
                lambda s=src: _load_folder(s, classes),
                cache_dir,
                cache,
            )
        ts = TensorSplit(
            data["images"],
            data["labels"],
            tuple(mean or spec["mean"]),
            tuple(std or spec["std"]),
            pad=4 if (augment and split == "train") else 0,
            flip=augment and split == "train",
        )
        splits[split] = limited(ts, limit if split == "train" else (test_limit or limit))
    form = "original python batches" if variant == "pickle" else "JPEG ImageFolder"
    return DataBundle(
        name=name,
        num_classes=len(classes),
        in_channels=3,
        image_size=32,
        splits=splits,
        class_names=list(classes),
        description=(
            f"{name.upper()} ({form}, {source}); train: random crop 32 (pad 4) + flip on the device"
            if augment
            else f"{name.upper()} ({form}, {source}); no augmentation"
        ),
        variant=variant,
    )


@register_dataset("cifar10", shape=(10, 3, 32))
def cifar10(
    root: str | None = None,
    *,
    format: str = "auto",
    path: str | None = None,
    download: bool = True,
    cache: bool = True,
    cache_dir: str | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    augment: bool = True,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DataBundle:
    """CIFAR-10, 32x32, 50k/10k (python batches, or a JPEG ImageFolder with format: jpeg)."""
    return _load(
        "cifar10",
        root,
        format,
        path,
        download,
        cache,
        cache_dir,
        limit,
        test_limit,
        augment,
        mean,
        std,
    )


@register_dataset("cifar100", shape=(100, 3, 32))
def cifar100(
    root: str | None = None,
    *,
    format: str = "auto",
    path: str | None = None,
    download: bool = True,
    cache: bool = True,
    cache_dir: str | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    augment: bool = True,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DataBundle:
    """CIFAR-100, 32x32, 50k/10k, 100 fine classes (python batches or a JPEG ImageFolder)."""
    return _load(
        "cifar100",
        root,
        format,
        path,
        download,
        cache,
        cache_dir,
        limit,
        test_limit,
        augment,
        mean,
        std,
    )
