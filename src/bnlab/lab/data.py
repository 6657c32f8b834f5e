"""Data: an IDX reader (gzip or raw) for MNIST-format directories, the whole data set held as
tensors, and per-seed batch order (thorough or within-shard shuffling, Ioffe Sec. 4.2.1).

Nothing is downloaded: Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bnlab.lab.config import DataConfig

__all__ = ["DEFAULT_DIR", "Batches", "Dataset", "check", "load", "read_idx"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = ("install Fashion-MNIST with `apt-get install dataset-fashion-mnist` (as root), "
                "or pass any MNIST-format IDX directory with --data-dir")
_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
          "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw): magic 0x0000, dtype byte, rank byte, the
    big-endian uint32 dimensions, then the data.

    Raises:
        ValueError: bad magic number, unknown dtype, or a file shorter than its header says.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged download
            raise ValueError(f"{path}: a damaged gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file: magic number must start with 0x0000, "
                         f"got {raw[:4].hex() or 'an empty file'}")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x}; expected one of "
                         f"{[hex(c) for c in _DTYPES]}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header: {len(raw)} bytes, expected {header}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: truncated or padded IDX file: {len(raw)} bytes, expected "
                         f"{expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: missing {stem}[.gz]; {INSTALL_HINT}")


@dataclass
class Dataset:
    """Train and held-out sets as tensors: x (N, 1, 28, 28) float32, y (N,) int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str  # the directory read

    @property
    def num_classes(self) -> int:
        # Both splits: a held-out label the training set lacks must still have an output.
        return int(max(self.train_y.max(), self.test_y.max())) + 1


def check(cfg: DataConfig) -> Path:
    """The data directory of ``cfg`` if it holds the four IDX files, else `FileNotFoundError`
    with the install command (checked before any run directory is created)."""
    directory = Path(cfg.dir or DEFAULT_DIR)
    if directory.exists() and not directory.is_dir():
        raise FileNotFoundError(f"data directory {directory} exists and is not a directory; "
                                f"{INSTALL_HINT}")
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {directory} does not exist; {INSTALL_HINT}")
    for stem in _FILES.values():
        _find(directory, stem)
    return directory


def load(cfg: DataConfig) -> Dataset:
    """Load the IDX directory ``cfg.dir`` (default Fashion-MNIST), binarized and/or normalized.

    Raises:
        FileNotFoundError: the directory or a file is missing (the message says how to install).
        ValueError: a file is not IDX, or images and labels do not match in number.
    """
    directory = check(cfg)
    arrays = {k: read_idx(_find(directory, stem)) for k, stem in _FILES.items()}
    for k, a in arrays.items():  # (swapped image and label files failed inside the model)
        want = 1 if k.endswith("_y") else 3
        if a.ndim != want:
            raise ValueError(f"{directory}: {_FILES[k]} must hold "
                             f"{'labels (N,)' if want == 1 else 'images (N, H, W)'}, got an "
                             f"array of shape {a.shape}")
        if want == 3 and a.dtype != np.uint8:  # pixels are read as 0..255 (÷ 255 below)
            raise ValueError(f"{directory}: {_FILES[k]} must hold uint8 pixels (IDX type "
                             f"0x08), as MNIST-format images do, got {a.dtype}")
    xs = {}
    for split in ("train", "test"):
        x = torch.from_numpy(arrays[f"{split}_x"].astype(np.float32) / 255.0)
        xs[split] = x.reshape(x.shape[0], 1, *x.shape[1:])  # (N, 28, 28) -> (N, 1, 28, 28)
    if cfg.binarize:
        xs = {k: (v > 0.5).float() for k, v in xs.items()}
    if cfg.normalize:
        mean, std = xs["train"].mean(), xs["train"].std().clamp_min(1e-8)
        xs = {k: (v - mean) / std for k, v in xs.items()}
    ys = {s: torch.from_numpy(arrays[f"{s}_y"].astype(np.int64)) for s in ("train", "test")}
    for split in ("train", "test"):  # else an index error in the middle of training
        images, labels = _FILES[f"{split}_x"], _FILES[f"{split}_y"]
        if len(ys[split]) != len(xs[split]):
            raise ValueError(f"{directory}: {images} has {len(xs[split])} images but {labels} "
                             f"has {len(ys[split])} labels")
        if len(ys[split]) == 0 or ys[split].min() < 0:
            raise ValueError(f"{directory}: {labels} must hold at least one label, all >= 0")
    return Dataset(xs["train"], ys["train"], xs["test"], ys["test"], str(directory))


class Batches:
    """Mini-batch indices as a pure function of (seed, step), so a resumed run sees the same
    batches as an uninterrupted one.

    ``shuffle="thorough"``: every epoch is a fresh permutation of the whole training set.
    ``shuffle="shards"``: the data set is cut into contiguous shards; each epoch visits the
    shards in a random order and shuffles only within a shard (the within-shard shuffling that
    Sec. 4.2.1 replaced by a more thorough one).
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, shuffle: str = "thorough",
                 shards: int = 10) -> None:
        if shuffle not in ("thorough", "shards"):
            raise ValueError(f"shuffle must be 'thorough' or 'shards', got {shuffle!r}")
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.shards = shuffle, max(1, min(shards, n))
        self.per_epoch = n // batch_size  # the last partial batch of an epoch is dropped
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.shuffle == "thorough":
            return torch.randperm(self.n, generator=g)
        bounds = torch.linspace(0, self.n, self.shards + 1).long().tolist()
        order = torch.randperm(self.shards, generator=g).tolist()
        return torch.cat([bounds[s] + torch.randperm(bounds[s + 1] - bounds[s], generator=g)
                          for s in order])

    def indices(self, step: int) -> Tensor:
        """Indices of the batch of optimizer step ``step`` (0-based)."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self._permutation(epoch)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]
