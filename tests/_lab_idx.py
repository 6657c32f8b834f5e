"""Tiny synthetic MNIST-format IDX directories for the lab's tests (no real data needed)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0x0000, dtype 0x08, rank, big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                     for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, *, gz: bool) -> Path:
    data = idx_bytes(arr)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_dataset(directory: Path, *, n_train: int = 400, n_test: int = 120,
                  gz: bool = True, seed: int = 0) -> Path:
    """A learnable 10-class data set: class c brightens rows 2c..2c+3 of noisy 28×28 images."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = rng.integers(0, 60, (n, 28, 28))
        for c in range(10):
            x[y == c, 2 * c:2 * c + 4, :] += 180
        write_idx(directory / f"{split}-images-idx3-ubyte", x, gz=gz)
        write_idx(directory / f"{split}-labels-idx1-ubyte", y, gz=gz)
    return directory
