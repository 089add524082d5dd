"""Loaders on the real data sets (skipped where ../shared/data is absent) and bad paths."""

import numpy as np
import pytest

from conftest import need_data
from hefl.data import by_key, load_femnist, load_shakespeare
from hefl.data.loaders import SHAKESPEARE_VOCAB, shakespeare_sequences
from hefl.errors import DataError


def test_femnist_npz_by_writer():
    fd = load_femnist(need_data("femnist_leaf") / "femnist_leaf_sf005_wenzhu_subset.npz")
    assert len(fd) == 105 and sum(fd.sizes) == 14640
    x = next(iter(fd.train.values())).x
    assert x.shape[1:] == (1, 28, 28) and x.dtype == np.float32
    assert x.mean() < 0.5  # inverted to MNIST polarity: mostly black background
    assert sum(len(d) for d in fd.test.values()) == 1677


def test_femnist_leaf_json_shards():
    fd = load_femnist(need_data("femnist_leaf") / "raw_leaf_json")
    assert len(fd) == 11 and sum(fd.sizes) == 674 + 653


def test_shakespeare_by_role():
    fd = load_shakespeare(need_data("shakespeare_tff"))
    assert len(fd) == 715
    d = next(iter(fd.train.values()))
    assert d.x.shape[1] == 80 and np.array_equal(d.x[:, 1:], d.y[:, :-1])
    assert d.x.max() < SHAKESPEARE_VOCAB


def test_shakespeare_sequences_shift_by_one():
    x, y = shakespeare_sequences(["ab"], seq_len=3)
    assert x.shape == (1, 3) and y[0, 0] == x[0, 1]


def test_unreadable_paths_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_femnist(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_femnist(bad)
    with pytest.raises(DataError, match="not found"):
        load_shakespeare(tmp_path)


def test_by_key_groups():
    parts = by_key(np.array(["admin", "blue", "admin"]))
    assert {k: v.tolist() for k, v in parts.items()} == {"admin": [0, 2], "blue": [1]}
