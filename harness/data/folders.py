"""ImageFolder layouts, in a folder or in a tar archive: ``[<prefix>/]<class>/<image>``.

Shared by the CIFAR JPEG variant (decoded whole into a uint8 tensor) and ImageNet
(listed, then decoded per batch). Every problem a user can fix (a missing folder, a
corrupt or truncated archive, an undecodable image) is a :class:`QbenchError` that
names the file.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from ..errors import QbenchError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def find_split(base: Path, split: str) -> Path | None:
    """``base/<split>/`` (a folder) or ``base/<split>.tar.gz`` / ``.tgz`` / ``.tar``."""
    folder = base / split
    if folder.is_dir():
        return folder
    for suffix in ARCHIVE_SUFFIXES:
        archive = base / f"{split}{suffix}"
        if archive.is_file():
            return archive
    return None


def _is_image(name: str) -> bool:
    p = PurePosixPath(name)
    return p.suffix.lower() in IMAGE_SUFFIXES and not any(
        part.startswith(".") or part == "__MACOSX" for part in p.parts
    )


def read_archive(path: Path) -> list[tuple[str, str, bytes]]:
    """Every image of a tar archive as (class folder name, member name, file bytes),
    sorted by member name. A damaged archive raises a QbenchError."""
    items: list[tuple[str, str, bytes]] = []
    try:
        with tarfile.open(path, mode="r:*") as tf:
            for m in tf:
                if not m.isfile() or not _is_image(m.name):
                    continue
                parts = PurePosixPath(m.name).parts
                if len(parts) < 2:
                    continue  # an image outside any class folder
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise EOFError(f"member {m.name} is cut short")
                items.append((parts[-2], m.name, data))
    except _ARCHIVE_ERRORS as e:
        raise QbenchError(
            f"archive is corrupt or truncated ({type(e).__name__}: {e}); copy it again", str(path)
        ) from None
    items.sort(key=lambda t: t[1])
    return items


def list_folder(path: Path) -> list[tuple[str, Path]]:
    """Every image under ``path/<class>/`` as (class folder name, file path), sorted."""
    out = []
    for cls in sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for root, _dirs, files in os.walk(cls):
            for name in sorted(files):
                if _is_image(name):
                    out.append((cls.name, Path(root) / name))
    return out


def read_folder(path: Path) -> list[tuple[str, str, bytes]]:
    return [(cls, str(p), p.read_bytes()) for cls, p in list_folder(path)]


def read_split(source: Path) -> list[tuple[str, str, bytes]]:
    items = read_archive(source) if is_archive(source) else read_folder(source)
    if not items:
        raise QbenchError(
            "no images found: expected <class>/<image>.jpg entries (ImageFolder layout)",
            str(source),
        )
    return items


def class_indices(names: list[str], canonical: list[str] | None, where: str) -> tuple[dict[str, int], list[str]]:
    """Map class folder names to label indices.

    With a canonical class list (CIFAR's class names, ImageNet's synsets), folders are
    looked up in it, so a folder order that differs (or missing classes) cannot shift
    the labels; folders named ``0``, ``1``, ... are taken as indices. Without one,
    sorted folder order (torchvision's ImageFolder rule).
    """
    present = sorted(set(names))
    if canonical is None:
        return {n: i for i, n in enumerate(present)}, present
    lookup = {n: i for i, n in enumerate(canonical)}
    if all(n in lookup for n in present):
        return {n: lookup[n] for n in present}, list(canonical)
    if all(n.isdigit() and int(n) < len(canonical) for n in present):
        return {n: int(n) for n in present}, list(canonical)
    unknown = [n for n in present if n not in lookup][:5]
    raise QbenchError(
        f"class folders {unknown} are not classes of this dataset; expected folder names "
        f"among {canonical[:10]}{' ...' if len(canonical) > 10 else ''} or 0..{len(canonical) - 1}",
        where,
    )


def _decode_one(data: torch.Tensor, name: str) -> torch.Tensor:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise QbenchError(f"cannot decode image ({e}); the file is damaged", name) from None


def _decode_chunk(chunk: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    datas = [d for _, d in chunk]
    if all(bytes(d[:2].tolist()) == b"\xff\xd8" for d in datas):
        try:
            return decode_jpeg(datas, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # find the damaged file below, one at a time
    return [_decode_one(d, n) for n, d in chunk]


def decode_all(items: list[tuple[str, str, bytes]], where: str, threads: int | None = None) -> torch.Tensor:
    """Decode every image to RGB uint8 and stack them: [N, 3, H, W]. All images must have
    the same size (the small datasets: 32x32)."""
    tensors = [(name, torch.frombuffer(bytearray(data), dtype=torch.uint8)) for _, name, data in items]
    threads = threads or min(16, os.cpu_count() or 1)
    size = max(1, -(-len(tensors) // (threads * 4)))
    chunks = [tensors[i : i + size] for i in range(0, len(tensors), size)]
    with ThreadPoolExecutor(threads) as pool:
        decoded = [img for part in pool.map(_decode_chunk, chunks) for img in part]
    shapes = {tuple(t.shape) for t in decoded}
    if len(shapes) != 1:
        odd = next(n for (n, _), t in zip(tensors, decoded, strict=False) if tuple(t.shape) != tuple(decoded[0].shape))
        raise QbenchError(
            f"images differ in size ({sorted(shapes)[:3]}...), e.g. {odd}; this dataset needs images of one size",
            where,
        )
    return torch.stack(decoded)
