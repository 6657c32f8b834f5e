"""The IDX reader, data loading and the per-seed batch order of `bnlab.lab.data`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _lab_idx import idx_bytes, write_dataset, write_idx
from bnlab.lab.config import DataConfig
from bnlab.lab.data import Batches, load, read_idx


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_gzip_and_raw(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte", arr, gz=gz)
    np.testing.assert_array_equal(read_idx(path), arr)
    labels = np.arange(9, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "y", labels, gz=gz)), labels)


def test_read_idx_rejects_bad_magic(tmp_path):
    bad = bytearray(idx_bytes(np.zeros((2, 3), np.uint8)))
    bad[0] = 0x12
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("cut", [3, 9, 20])
def test_read_idx_rejects_truncated_file(tmp_path, cut):
    data = idx_bytes(np.ones((2, 5, 5), np.uint8))  # header 16 bytes + 50 data bytes
    (tmp_path / "short").write_bytes(data[:len(data) - cut] if cut < 20 else data[:10])
    with pytest.raises(ValueError, match=r"truncated|magic"):
        read_idx(tmp_path / "short")


def test_load_binarize_and_normalize(tmp_path):
    d = write_dataset(tmp_path / "idx", gz=False)
    ds = load(DataConfig(dir=str(d), binarize=True, normalize=False))
    assert ds.train_x.shape == (400, 1, 28, 28) and ds.test_x.shape == (120, 1, 28, 28)
    assert set(ds.train_x.unique().tolist()) == {0.0, 1.0}
    assert ds.num_classes == 10 and ds.train_y.dtype == torch.int64
    ds = load(DataConfig(dir=str(d), normalize=True))
    assert abs(float(ds.train_x.mean())) < 1e-4 and abs(float(ds.train_x.std()) - 1) < 1e-3


def test_missing_data_set_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load(DataConfig(dir=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load(DataConfig(dir=str(tmp_path / "empty")))


def test_thorough_shuffle_is_a_per_seed_permutation_per_epoch():
    b = Batches(100, 10, seed=3)
    epoch = torch.cat([b.indices(s) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))  # every example once per epoch
    again = torch.cat([Batches(100, 10, seed=3).indices(s) for s in range(10)])
    assert torch.equal(epoch, again)  # a pure function of (seed, step): resumable
    other = torch.cat([Batches(100, 10, seed=4).indices(s) for s in range(10)])
    assert not torch.equal(epoch, other)
    nxt = torch.cat([b.indices(s) for s in range(10, 20)])
    assert not torch.equal(epoch, nxt)  # a fresh permutation every epoch


def test_shard_shuffle_stays_within_shards():
    b = Batches(100, 10, seed=0, shuffle="shards", shards=5)
    order = torch.cat([b.indices(s) for s in range(10)])
    assert sorted(order.tolist()) == list(range(100))
    shard_of = (order // 20).tolist()  # 20 contiguous examples per shard
    runs = [shard_of[i:i + 20] for i in range(0, 100, 20)]
    assert all(len(set(r)) == 1 for r in runs)  # one shard at a time
    with pytest.raises(ValueError, match="shuffle"):
        Batches(100, 10, seed=0, shuffle="sometimes")


def test_images_and_labels_must_match_and_classes_count_both_splits(tmp_path):
    """A directory whose label file is shorter than its image file failed mid-training with an
    index error; a class missing from the training labels had no output for its test labels."""
    d = write_dataset(tmp_path / "ok", n_train=50, n_test=20)
    cfg = DataConfig(dir=str(d))
    train_y = read_idx(d / "train-labels-idx1-ubyte.gz")
    write_idx(d / "train-labels-idx1-ubyte", train_y[:40], gz=True)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte has 50 images but "
                       "train-labels-idx1-ubyte has 40 labels"):
        load(cfg)
    write_idx(d / "train-labels-idx1-ubyte", np.minimum(train_y, 8), gz=True)  # no class 9
    assert load(cfg).num_classes == 10  # the held-out set has 9s
