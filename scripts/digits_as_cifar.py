"""Write scikit-learn's bundled digits in the CIFAR-10 *binary* format (cifar-10-batches-bin/).

A CIFAR-format subset made of real data, for workloads that need 32x32x3 inputs (ResNet-20,
VGG-11) on a machine without CIFAR: each 8x8 digit (pixel values 0..16) is scaled to 0..255
(``v * 255 // 16``), enlarged 4x by pixel repetition to 32x32, and written to the three colour
planes; the label is the digit.  Train / test are the same split as the ``digits`` dataset
(``default_rng(0)`` permutation, 20 % test: 1,437 / 360); the training records are spread over
data_batch_1..5.bin in order.  Load with ``data: {name: cifar10, data_dir: DIR}``.

    python scripts/digits_as_cifar.py DIR
"""
from __future__ import annotations

import os
import sys

import numpy as np


def records(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, 3073) uint8 CIFAR-10 records: label byte, then 1024 R, 1024 G, 1024 B, row-major."""
    v = (images.astype(np.int64) * 255 // 16).astype(np.uint8)          # (N, 8, 8)
    big = np.repeat(np.repeat(v, 4, axis=1), 4, axis=2).reshape(len(v), 1024)
    rec = np.empty((len(v), 3073), dtype=np.uint8)
    rec[:, 0] = labels
    for c in range(3):
        rec[:, 1 + 1024 * c:1 + 1024 * (c + 1)] = big
    return rec


def write(root: str, split_seed: int = 0, test_fraction: float = 0.2) -> str:
    """Write ROOT/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin; returns ROOT."""
    from sklearn.datasets import load_digits
    raw = load_digits()
    n = len(raw.target)
    perm = np.random.default_rng(split_seed).permutation(n)
    n_test = int(round(test_fraction * n))
    tr, te = perm[: n - n_test], perm[n - n_test:]
    d = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)
    rec = records(raw.images[tr], raw.target[tr])
    for k, part in enumerate(np.array_split(rec, 5), start=1):
        part.tofile(os.path.join(d, f"data_batch_{k}.bin"))
    records(raw.images[te], raw.target[te]).tofile(os.path.join(d, "test_batch.bin"))
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write(sys.argv[1]))
