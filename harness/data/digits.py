"""scikit-learn's handwritten digits: 1,797 real 8x8 grey images, shipped inside scikit-learn.

The embedded default, so ``qbench run`` works with no download. Split: a fixed,
stratified 80/20 train/test split (``sklearn.model_selection.train_test_split`` with
``test_size=0.2, random_state=0, stratify=y``): 1,437 training and 360 test images.
Pixel values 0..16 are stored as uint8 ``v * 15`` (0..240), so the conversion is exact.
No augmentation (the images are tiny and centred).
"""

from __future__ import annotations

import numpy as np
import torch

from . import register_dataset
from .base import DataBundle, TensorSplit


@register_dataset("digits", shape=(10, 1, 8))
def digits(root: str | None = None, **_options) -> DataBundle:
    """scikit-learn's handwritten digits, 8x8 grey, embedded (1,437 train / 360 test, fixed split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images.astype(np.float64) * 15).round().astype(np.uint8)[:, None]  # [N,1,8,8]
    labels = data.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=labels)
    train_imgs = images[tr].astype(np.float64) / 255.0
    mean, std = (float(train_imgs.mean()),), (float(train_imgs.std()),)

    def split(ix: np.ndarray) -> TensorSplit:
        return TensorSplit(torch.from_numpy(images[ix].copy()), torch.from_numpy(labels[ix].copy()), mean, std)

    return DataBundle(
        name="digits",
        num_classes=10,
        in_channels=1,
        image_size=8,
        splits={"train": split(tr), "test": split(te)},
        class_names=[str(i) for i in range(10)],
        description="scikit-learn digits, 8x8, fixed stratified 80/20 split (random_state=0)",
    )
