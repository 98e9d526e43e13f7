"""Tests for epmq_jax.data: local array_record tfds datasets, the task registry, calibration.

Every dataset here is written by the test itself into tmp_path (tfds custom builder, no
TensorFlow, no network).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from epmq_jax.data import tfds_local


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-split dataset with images, labels, text and float vectors, and its source arrays."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path_factory.mktemp("tfds")

    def split(n, prefix):
        return {"image": rng.integers(0, 256, (n, 9, 7, 3), dtype=np.uint8),
                "label": rng.integers(0, 5, n),
                "text": np.array([f"{prefix} {i} é" for i in range(n)]),
                "emb": rng.standard_normal((n, 4)).astype(np.float32)}

    splits = {"train": split(23, "tr"), "test": split(6, "te")}
    tfds_local.write_local_dataset("tiny_ds", data_dir, splits, num_classes={"label": 5})
    return data_dir, splits


def test_round_trip_is_exact_and_ordered(tiny):
    data_dir, splits = tiny
    for name, cols in splits.items():
        got = tfds_local.load_split("tiny_ds", name, data_dir)
        assert sorted(got) == sorted(cols)
        for k, v in cols.items():
            assert got[k].shape == v.shape, k
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        assert got["image"].dtype == np.uint8 and got["emb"].dtype == np.float32
    assert tfds_local.split_sizes("tiny_ds", data_dir) == {"train": 23, "test": 6}
    assert tfds_local.features_of("tiny_ds", data_dir)["label"].num_classes == 5


def test_indices_keys_and_slicing(tiny):
    data_dir, splits = tiny
    got = tfds_local.load_split("tiny_ds", "train", data_dir, indices=[7, 0, 7], keys=["label"])
    assert list(got) == ["label"]
    np.testing.assert_array_equal(got["label"], splits["train"]["label"][[7, 0, 7]])
    tail = tfds_local.load_split("tiny_ds", "train[20:]", data_dir, keys=["text"])
    np.testing.assert_array_equal(tail["text"], splits["train"]["text"][20:])
    src = tfds_local.open_split("tiny_ds", "test", data_dir)
    assert len(src) == 6
    np.testing.assert_array_equal(src[3]["image"], splits["test"]["image"][3])
    with pytest.raises(ValueError, match="no split 'validation'"):
        tfds_local.load_split("tiny_ds", "validation", data_dir)
    with pytest.raises(ValueError, match="out of range"):
        tfds_local.load_split("tiny_ds", "test", data_dir, indices=[6])
    with pytest.raises(ValueError, match="no column"):
        tfds_local.load_split("tiny_ds", "test", data_dir, keys=["pixels"])


def test_variable_size_grayscale_images(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (h, 5, 1), dtype=np.uint8) for h in (3, 4, 6)]
    tfds_local.write_local_dataset("var_ds", tmp_path, {"train": {"image": imgs,
                                                                 "label": np.array([2, 0, 1])}})
    got = tfds_local.load_split("var_ds", "train", tmp_path)
    assert isinstance(got["image"], list)
    for a, b in zip(got["image"], imgs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got["label"], [2, 0, 1])


def test_write_errors(tmp_path, tiny):
    data_dir, splits = tiny
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tfds_local.write_local_dataset("tiny_ds", data_dir, splits)
    with pytest.raises(ValueError, match="snake case"):
        tfds_local.write_local_dataset("Bad-Name", tmp_path, splits)
    with pytest.raises(ValueError, match="different lengths"):
        tfds_local.write_local_dataset("x", tmp_path, {"train": {"a": np.zeros(3), "b": np.zeros(2)}})
    with pytest.raises(ValueError, match="columns"):
        tfds_local.write_local_dataset("x", tmp_path, {"train": {"a": np.zeros(3)},
                                                       "test": {"b": np.zeros(3)}})


def test_missing_dataset_fails_fast_with_clear_message(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(tfds_local.DatasetNotFoundError) as err:
        tfds_local.load_split("mnist", "train", tmp_path)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "mnist" in msg and str(tmp_path) in msg and "never downloads" in msg
    assert not tfds_local.dataset_exists("mnist", tmp_path)
