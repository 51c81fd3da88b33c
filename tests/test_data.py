"""Datasets: the registry, the GPU-style batching of TensorSplit, and every dataset on real
files (../shared/data) or on small files written here in the real formats."""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from qbench.harness.data import DATASETS, load_dataset
from qbench.harness.data.base import TensorSplit, crop_flip
from qbench.harness.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from qbench.harness.errors import QbenchError
from torchvision.io import encode_jpeg


def test_registry_lists_the_papers_datasets():
    assert {"digits", "mnist", "cifar10", "cifar100", "imagenet"} <= set(DATASETS.names())
    with pytest.raises(QbenchError, match="did you mean 'cifar10'"):
        load_dataset("cifar01")


# -- TensorSplit: batching and augmentation on the device ------------------------------------
def _ramp_split(n=6, pad=4, flip=True) -> TensorSplit:
    # pixel value encodes its column, so crops and flips are visible in the output
    cols = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8).expand(n, 3, 8, 8) * 10 + 10
    return TensorSplit(cols.contiguous(), torch.arange(n), (0.0, 0.0, 0.0), (1 / 255,) * 3, pad, flip)


def test_crop_flip_matches_pad_crop_then_mirror():
    x = torch.randint(0, 255, (4, 3, 5, 7), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 2, 4, 1]), torch.tensor([3, 0, 4, 2])
    flip = torch.tensor([False, True, True, False])
    out = crop_flip(x, 2, dy, dx, flip)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        ref = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 7]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_tensor_split_eval_is_ordered_and_normalised():
    s = _ramp_split(pad=0, flip=False)
    xs, ys = zip(*s.batches(4, train=False, device=torch.device("cpu")), strict=False)
    assert [len(y) for y in ys] == [4, 2]
    assert torch.equal(torch.cat(ys), torch.arange(6))
    # mean 0, std 1/255: the normalised value is the raw pixel value
    assert torch.equal(xs[0][0, 0, 0], torch.arange(8, dtype=torch.float32) * 10 + 10)


def test_tensor_split_train_shuffles_crops_and_is_reproducible():
    s = _ramp_split(n=64)
    a = list(s.batches(16, train=True, device=torch.device("cpu"), generator=torch.Generator().manual_seed(1)))
    b = list(s.batches(16, train=True, device=torch.device("cpu"), generator=torch.Generator().manual_seed(1)))
    for (xa, ya), (xb, yb) in zip(a, b, strict=False):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    labels = torch.cat([y for _, y in a])
    assert sorted(labels.tolist()) == list(range(64)) and labels.tolist() != list(range(64))
    x = torch.cat([x for x, _ in a])
    assert (x == 0).any(), "zero padding (black, value 0 before normalising) must show up"
    rows = x[:, 0, 4]  # a middle row: a shifted (possibly mirrored) ramp
    flipped = (rows[:, 1:] < rows[:, :-1]).any(dim=1) & ~(rows[:, 1:] > rows[:, :-1]).any(dim=1)
    assert 0 < int(flipped.sum()) < 64


def test_tensor_split_drop_last_and_channels_last():
    s = _ramp_split(n=10, pad=0, flip=False)
    got = list(s.batches(4, train=True, device=torch.device("cpu"), drop_last=True, channels_last=True))
    assert [len(y) for _, y in got] == [4, 4]
    assert got[0][0].is_contiguous(memory_format=torch.channels_last)


# -- MNIST -----------------------------------------------------------------------------------
def _idx(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(np.uint8).tobytes()


def test_mnist_real_test_split(shared_data, tmp_path):
    b = load_dataset("mnist", path=str(shared_data / "mnist"), download=False, cache_dir=str(tmp_path))
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 28)
    assert len(b.test) == 10_000
    assert torch.equal(
        torch.bincount(b.test.labels),
        torch.tensor([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    )  # the test split's class counts
    assert b.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # its first ten labels
    x, y = next(iter(b.test.batches(32, train=False, device=torch.device("cpu"))))
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)
    assert abs(float(b.test.images.float().div(255).mean()) - 0.1325) < 0.002
    # the training files are not in the shared data: using that split says what to put where
    with pytest.raises(QbenchError, match="train-images-idx3-ubyte.gz"):
        len(b.train)
    assert list(tmp_path.glob("mnist-test-*.pt")), "the decoded split is cached"


def test_mnist_reads_torchvision_layout_and_rejects_truncated_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 255, (n, 28, 28))))
        with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(_idx(np.arange(n) % 10))
    b = load_dataset("mnist", str(tmp_path), download=False, cache=False)
    assert (len(b.train), len(b.test)) == (12, 5)
    assert b.train.labels.tolist() == [i % 10 for i in range(12)]
    # mean 0, std 1: pixels in [0, 1] as the Bayesian Bits loader (ToTensor only)
    raw01 = load_dataset("mnist", str(tmp_path), download=False, cache=False, mean=[0.0], std=[1.0])
    x01, _ = next(iter(raw01.test.batches(5, train=False, device=torch.device("cpu"))))
    x, _ = next(iter(b.test.batches(5, train=False, device=torch.device("cpu"))))
    assert torch.allclose(x01, b.test.images.float().div(255).view_as(x01), atol=1e-6)
    assert torch.allclose(x, (x01 - 0.1307) / 0.3081, atol=1e-5)
    with pytest.raises(QbenchError, match=r"std must be one number above 0") as err:
        load_dataset("mnist", str(tmp_path), download=False, cache=False, std=[0.0])
    assert err.value.where == "mnist.std"
    data = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(QbenchError, match="truncated"):
        load_dataset("mnist", str(tmp_path), download=False, cache=False)


def test_mnist_missing_files_error_says_where(tmp_path):
    with pytest.raises(QbenchError, match=r"MNIST files not found: put .* in .*MNIST/raw"):
        load_dataset("mnist", str(tmp_path), download=False)


# -- CIFAR -----------------------------------------------------------------------------------
def test_cifar_class_lists():
    assert CIFAR10_CLASSES == sorted(CIFAR10_CLASSES)  # CIFAR-10's order is alphabetical
    assert len(CIFAR100_CLASSES) == 100 and CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)


@pytest.fixture(scope="module")
def cifar_jpeg_test_only(tmp_path_factory, shared_data):
    """A root whose train and test archives are both the real 10k test archive: the JPEG
    path end to end at a fifth of the decoding cost of the real training archive."""
    root = tmp_path_factory.mktemp("cifar")
    (root / "cifar10-jpeg").mkdir()
    for split in ("train", "test"):
        (root / "cifar10-jpeg" / f"{split}.tar.gz").symlink_to(shared_data / "cifar10-jpeg" / "test.tar.gz")
    return root


def test_cifar10_jpeg_loads_with_class_order(cifar_jpeg_test_only, tmp_path):
    b = load_dataset("cifar10", str(cifar_jpeg_test_only), download=False, cache_dir=str(tmp_path))
    assert b.variant == "jpeg" and "JPEG" in b.description
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, 32)
    assert b.class_names == CIFAR10_CLASSES
    assert b.test.images.shape == (10_000, 3, 32, 32) and b.test.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(b.test.labels), torch.full((10,), 1000))
    # archive members are class-sorted: the first 1000 are airplanes, the last 1000 trucks
    assert set(b.test.labels[:1000].tolist()) == {0} and set(b.test.labels[-1000:].tolist()) == {9}
    # real photographs: per-channel means near CIFAR-10's (R > G > B)
    m = b.test.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(m, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.02) and m[0] > m[2]
    assert (b.train.pad, b.train.flip, b.test.pad, b.test.flip) == (4, True, 0, False)
    # the second load comes from the cache and is identical
    c = load_dataset("cifar10", str(cifar_jpeg_test_only), download=False, cache_dir=str(tmp_path))
    assert torch.equal(c.test.images, b.test.images)
    sl = load_dataset("cifar10", str(cifar_jpeg_test_only), download=False, cache_dir=str(tmp_path), limit=500)
    assert len(sl.train) == len(sl.test) == 500


@pytest.mark.slow
def test_cifar10_real_train_archive(shared_data, tmp_path):
    b = load_dataset("cifar10", str(shared_data), format="jpeg", download=False, cache_dir=str(tmp_path))
    assert b.train.images.shape == (50_000, 3, 32, 32)
    assert torch.equal(torch.bincount(b.train.labels), torch.full((10,), 5000))


def test_truncated_archive_gives_a_clear_error(shared_data, tmp_path):
    root = tmp_path / "cifar10-jpeg"
    root.mkdir()
    data = (shared_data / "cifar10-jpeg" / "test.tar.gz").read_bytes()
    (root / "train.tar.gz").write_bytes(data[: len(data) // 3])
    (root / "test.tar.gz").write_bytes(data)
    with pytest.raises(QbenchError, match=r"train.tar.gz: archive is corrupt or truncated"):
        load_dataset("cifar10", str(tmp_path), download=False, cache=False)
    (root / "train.tar.gz").write_bytes(b"this is not an archive at all" * 50)
    with pytest.raises(QbenchError, match="corrupt or truncated"):
        load_dataset("cifar10", str(tmp_path), download=False, cache=False)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _jpeg(value: int) -> bytes:
    return encode_jpeg(torch.full((3, 32, 32), value, dtype=torch.uint8), quality=95).numpy().tobytes()


def test_damaged_image_and_unknown_class_are_named(tmp_path):
    root = tmp_path / "cifar10-jpeg"
    root.mkdir()
    _tar(root / "test.tar.gz", {"test/cat/0.jpg": _jpeg(100), "test/dog/1.jpg": _jpeg(50)})
    _tar(root / "train.tar.gz", {"train/cat/0.jpg": _jpeg(100), "train/dog/1.jpg": b"\xff\xd8broken"})
    with pytest.raises(QbenchError, match=r"train/dog/1.jpg: cannot decode"):
        load_dataset("cifar10", str(tmp_path), download=False, cache=False)
    _tar(root / "train.tar.gz", {"train/cat/0.jpg": _jpeg(100), "train/kitten/1.jpg": _jpeg(1)})
    with pytest.raises(QbenchError, match=r"\['kitten'\] are not classes"):
        load_dataset("cifar10", str(tmp_path), download=False, cache=False)
    _tar(root / "train.tar.gz", {"train/cat/0.jpg": _jpeg(100), "train/ship/1.jpg": _jpeg(200)})
    b = load_dataset("cifar10", str(tmp_path), download=False, cache=False)
    assert b.train.labels.tolist() == [3, 8] and b.test.labels.tolist() == [3, 5]
    assert abs(int(b.train.images[1].float().mean()) - 200) <= 2


def _cifar_pickle_dir(base: Path, name: str, n_per_file: int, files: list[str], key: str, classes: int):
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in files:
        batch = {
            "data": rng.integers(0, 255, (n_per_file, 3072), dtype=np.uint8),
            key: list(range(n_per_file)) if classes > n_per_file else [i % classes for i in range(n_per_file)],
        }
        (base / f).write_bytes(pickle.dumps(batch))


def test_cifar10_and_100_pickle_layouts(tmp_path):
    _cifar_pickle_dir(
        tmp_path / "cifar-10-batches-py",
        "cifar10",
        4,
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        "labels",
        10,
    )
    b = load_dataset("cifar10", str(tmp_path), download=False, cache=False)
    assert b.variant == "pickle" and len(b.train) == 20 and len(b.test) == 4
    assert b.train.images.shape == (20, 3, 32, 32)
    _cifar_pickle_dir(tmp_path / "cifar-100-python", "cifar100", 7, ["train", "test"], "fine_labels", 100)
    c = load_dataset("cifar100", str(tmp_path), download=False, cache=False)
    assert c.num_classes == 100 and len(c.train) == 7 and c.train.labels.tolist() == list(range(7))
    # the downloaded archive works without unpacking
    shutil.make_archive(str(tmp_path / "x" / "cifar-10-python"), "gztar", tmp_path, "cifar-10-batches-py")
    d = load_dataset("cifar10", str(tmp_path / "x"), download=False, cache=False)
    assert torch.equal(d.train.images, b.train.images)


def test_cifar_missing_says_what_to_put_where(tmp_path):
    with pytest.raises(QbenchError, match=r"cifar-10-batches-py.*cifar10-jpeg/\{train,test\}.tar.gz"):
        load_dataset("cifar10", str(tmp_path), download=False)
    with pytest.raises(QbenchError, match="format must be one of"):
        load_dataset("cifar10", str(tmp_path), format="png")


# -- ImageNet ----------------------------------------------------------------------------------
def test_imagenet_sample_uses_canonical_indices(shared_data, tmp_path):
    b = load_dataset(
        "imagenet",
        path=str(shared_data / "imagenet-sample"),
        num_workers=0,
        cache_dir=str(tmp_path),
    )
    assert b.num_classes == 1000 and len(b.test) == 500 and b.image_size == 224
    # one image for every second synset: folder order would give 0..499, canonical gives evens
    assert b.test.labels.tolist() == list(range(0, 1000, 2))
    assert b.class_names[0] == "n01440764" and b.class_names[999] == "n15075141"
    x, y = next(iter(b.test.batches(4, train=False, device=torch.device("cpu"))))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 2, 4, 6]
    assert -1.0 < float(x.mean()) < 1.0 and float(x.std()) > 0.5  # normalised real photos
    xt, yt = next(
        iter(
            b.test.batches(
                4,
                train=True,
                device=torch.device("cpu"),
                generator=torch.Generator().manual_seed(0),
            )
        )
    )
    assert xt.shape == (4, 3, 224, 224) and all(v % 2 == 0 for v in yt.tolist())
    with pytest.raises(QbenchError, match="train split is missing"):
        len(b.train)


def test_imagenet_missing_is_clear(tmp_path):
    with pytest.raises(QbenchError, match=r"ImageNet not found: put ImageFolder train/<synset>"):
        load_dataset("imagenet", str(tmp_path))
