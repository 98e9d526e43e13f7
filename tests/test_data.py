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
    small = {"train": {"label": np.array([3, 1])}}
    tfds_local.write_local_dataset("rewrite_ds", tmp_path, {"train": {"label": np.array([0, 0, 0])}})
    tfds_local.write_local_dataset("rewrite_ds", tmp_path, small, overwrite=True)
    np.testing.assert_array_equal(tfds_local.load_split("rewrite_ds", "train", tmp_path)["label"],
                                  [3, 1])
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


def test_dataset_writer_is_all_or_nothing(tmp_path):
    import tensorflow_datasets as tfds

    feats = {"image": tfds_local.image_feature(3), "label": tfds.features.ClassLabel(num_classes=3)}
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    with tfds_local.DatasetWriter("w_ds", tmp_path, feats, ["train"]) as w:
        w.add("train", [{"image": img, "label": 1}, {"image": img, "label": 2}])
        with pytest.raises(ValueError, match="not declared"):
            w.add("test", [{"image": img, "label": 0}])
        assert not tfds_local.dataset_exists("w_ds", tmp_path)  # only complete datasets appear
    np.testing.assert_array_equal(tfds_local.load_split("w_ds", "train", tmp_path)["label"], [1, 2])
    with pytest.raises(RuntimeError, match="outside"):
        w.add("train", [{"image": img, "label": 0}])
    # An error part-way through an overwrite keeps the old dataset and leaves no debris.
    with pytest.raises(KeyError):
        with tfds_local.DatasetWriter("w_ds", tmp_path, feats, ["train"], overwrite=True) as w:
            w.add("train", [{"image": img, "label": 0}])
            raise KeyError("interrupted")
    np.testing.assert_array_equal(tfds_local.load_split("w_ds", "train", tmp_path)["label"], [1, 2])
    with pytest.raises(ValueError, match=r"\['test'\] got no examples"):
        with tfds_local.DatasetWriter("w_ds", tmp_path, feats, ["train", "test"],
                                      overwrite=True) as w:
            w.add("train", [{"image": img, "label": 0}])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tfds_local.DatasetWriter("w_ds", tmp_path, feats, ["train"])
    with tfds_local.DatasetWriter("w_ds", tmp_path, feats, ["train"], overwrite=True) as w:
        w.add("train", [{"image": img, "label": 0}])
    np.testing.assert_array_equal(tfds_local.load_split("w_ds", "train", tmp_path)["label"], [0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w_ds"]
    assert [p.name for p in (tmp_path / "w_ds").iterdir()] == ["1.0.0"]


def test_storable_image_bytes_keeps_jpeg_and_png_and_converts_the_rest():
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)

    def encode(fmt, mode):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
        return buf.getvalue()

    for fmt, mode in (("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")):
        data = encode(fmt, mode)
        assert tfds_local.storable_image_bytes(data) is data, (fmt, mode)
    for fmt, mode in (("PNG", "P"), ("PNG", "RGBA"), ("JPEG", "CMYK"), ("BMP", "RGB")):
        data = encode(fmt, mode)
        out = tfds_local.storable_image_bytes(data)
        with Image.open(io.BytesIO(out)) as im, Image.open(io.BytesIO(data)) as ref:
            assert (im.format, im.mode) == ("PNG", "RGB")
            np.testing.assert_array_equal(np.asarray(im), np.asarray(ref.convert("RGB")))
    with pytest.raises(ValueError, match="Not an image"):
        tfds_local.storable_image_bytes(b"not an image at all")


# ----------------------------------------------------------------------------- registry

from epmq_jax.data import calibration, registry  # noqa: E402
from epmq_jax.models import templates  # noqa: E402


def test_tfds_options_exist_in_tfds_with_the_heads_class_count():
    import tensorflow_datasets as tfds

    with_tfds = [t for t in templates.TASKS_20 if registry.get_task(t).tfds]
    # tfds builders that are dead (SUN397, Cars), manual (RESISC45), single-split (EuroSAT)
    # or missing (GTSRB, FER2013, Rendered SST-2) are not offered.
    assert set(templates.TASKS_20) - set(with_tfds) == {
        "sun397", "stanford_cars", "resisc45", "eurosat", "gtsrb", "fer2013", "rendered_sst2"}
    for task in with_tfds:
        spec = registry.get_task(task)
        assert {"train", "test"} <= set(spec.tfds.splits), task
        # tfds' builder code (offline metadata) knows the dataset, its keys and class count.
        feats = tfds.builder(spec.tfds.name, data_dir="/nonexistent", try_gcs=False).info.features
        assert isinstance(feats[spec.tfds.image_key], tfds.features.Image), task
        n = feats[spec.tfds.label_key].num_classes
        assert n == spec.num_classes or (task == "emnist_letters" and n == 37), (task, n)
    assert registry.get_task("cars").name == "stanford_cars"
    assert registry.get_task("oxford-iiit-pet").name == "oxford_iiit_pet"
    with pytest.raises(ValueError, match="Unknown task"):
        registry.get_task("imagenet21k")


def test_label_permutation_against_tfds_class_names():
    import tensorflow_datasets as tfds

    swapped = {}
    for task in templates.TASKS_20:
        spec = registry.get_task(task)
        if spec.tfds is None:
            continue
        names = tfds.builder(spec.tfds.name, data_dir="/nonexistent",
                             try_gcs=False).info.features[spec.tfds.label_key].names
        perm = registry.label_permutation(task, names)
        if perm is not None:
            swapped[task] = [(i, int(p)) for i, p in enumerate(perm) if p != i]
    # Tasks whose tfds names equal the head's names (up to case/punctuation) are matched...
    assert {"dtd", "oxford_flowers102", "oxford_iiit_pet", "fashion_mnist", "food101"} <= set(swapped)
    # ...and only Food-101 needs re-indexing: two adjacent classes swapped.
    assert {t: len(v) for t, v in swapped.items() if v} == {"food101": 2}
    i, j = swapped["food101"][0]
    assert templates.task_prompts("food101").classnames[j] == "cheesecake"
    assert swapped["food101"] == [(i, j), (j, i)]
    # SUN397's tfds names (builder dead, names still in tfds' metadata) need it too.
    sun = tfds.builder("sun397/tfds", data_dir="/nonexistent", try_gcs=False).info.features["label"]
    perm = registry.label_permutation("sun397", sun.names)
    assert perm is not None and int(np.sum(perm != np.arange(397))) == 2
    assert registry.label_permutation("mnist", ["a"] * 10) is None


def _fake_task_dataset(data_dir, name, n_train, n_test, num_classes, seed=0, names=None):
    rng = np.random.default_rng(seed)
    splits = {s: {"image": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
                  "label": rng.integers(0, num_classes, n)}
              for s, n in (("train", n_train), ("test", n_test)) if n}
    feats = {"label": tfds_label(names)} if names else None
    tfds_local.write_local_dataset(name, data_dir, splits, features=feats,
                                   num_classes=None if names else {"label": num_classes})
    return splits


def tfds_label(names):
    import tensorflow_datasets as tfds

    return tfds.features.ClassLabel(names=names)


def test_load_task_split_from_tfds_with_offset_and_reindexing(tmp_path, monkeypatch):
    mn = _fake_task_dataset(tmp_path, "mnist", 9, 4, 10)
    got = registry.load_task_split("mnist", "test", tmp_path, indices=[3, 1])
    np.testing.assert_array_equal(got["image"], mn["test"]["image"][[3, 1]])
    np.testing.assert_array_equal(got["label"], mn["test"]["label"][[3, 1]])
    assert registry.split_size("mnist", "train", tmp_path) == 9
    # RESISC45 has no tfds option (tfds has one split only): a tfds copy is not used.
    _fake_task_dataset(tmp_path, "resisc45", 10, 0, 45)
    with pytest.raises(tfds_local.DatasetNotFoundError, match="epmq_resisc45"):
        registry.load_task_split("resisc45", "train", tmp_path)
    # Stored names in another order than the head's are re-indexed by name.
    head = list(templates.task_prompts("dtd").classnames)
    dt = _fake_task_dataset(tmp_path, "dtd", 12, 3, 47, names=head[::-1])
    got = registry.load_task_split("dtd", "train", tmp_path)["label"]
    np.testing.assert_array_equal(got, 46 - dt["train"]["label"])
    # A tfds source with label_offset: stored labels 1..26 -> head indices 0..25.
    spec = registry.TaskSpec("emnist_letters", 26, registry.HFSource("x/letters"),
                             registry.TfdsSource("tiny_letters", label_offset=-1))
    monkeypatch.setitem(registry.TASKS, "emnist_letters", spec)
    lab = np.random.default_rng(0).integers(1, 27, 8)
    tfds_local.write_local_dataset("tiny_letters", tmp_path, {
        "train": {"image": np.zeros((8, 2, 2, 1), np.uint8), "label": lab},
        "test": {"image": np.zeros((1, 2, 2, 1), np.uint8), "label": lab[:1]}},
        num_classes={"label": 37})
    np.testing.assert_array_equal(
        registry.load_task_split("emnist_letters", "train", tmp_path)["label"], lab - 1)
    with pytest.raises(ValueError, match="no split 'extra'"):
        registry.load_task_split("mnist", "extra", tmp_path)
    with pytest.raises(ValueError, match="no split 'validation'"):
        registry.split_size("mnist", "validation", tmp_path)
    # The prepared epmq_<task> store wins over a tfds copy of the same task.
    _fake_task_dataset(tmp_path, "epmq_mnist", 5, 2, 10, seed=3)
    assert registry.resolve_task("mnist", tmp_path).dataset == "epmq_mnist"
    assert registry.split_size("mnist", "train", tmp_path) == 5


def test_image_folder_streams_into_the_store(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    root = tmp_path / "gtsrb_raw"
    expected = {}
    for split, per_class in (("train", 3), ("test", 1)):
        imgs, labels = [], []
        for c in range(43):
            d = root / split / f"{c:05d}"
            d.mkdir(parents=True)
            for k in range(per_class):
                img = rng.integers(0, 256, (5 + c % 3, 6, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{k}.ppm")
                imgs.append(img)
                labels.append(c)
        expected[split] = (imgs, np.array(labels))
    data_dir = tmp_path / "data"
    with pytest.raises(tfds_local.DatasetNotFoundError, match="prepare_from_image_folder"):
        registry.load_task_split("gtsrb", "train", data_dir)
    registry.prepare_from_image_folder("gtsrb", root, data_dir, batch_size=16)
    for split, (imgs, labels) in expected.items():
        got = registry.load_task_split("gtsrb", split, data_dir)
        np.testing.assert_array_equal(got["label"], labels)
        assert len(got["image"]) == len(imgs)
        for a, b in zip(got["image"], imgs):
            np.testing.assert_array_equal(a, b)  # PPM -> PNG is lossless
    # No validation folder: the seeded 10% draw of train, in order.
    mask = np.random.default_rng(registry.VALIDATION_SEED).random(129) < registry.VALIDATION_FRACTION
    val = registry.load_task_split("gtsrb", "validation", data_dir)
    np.testing.assert_array_equal(val["label"], expected["train"][1][mask])
    bad = tmp_path / "bad"
    (bad / "train" / "a").mkdir(parents=True)
    (bad / "test" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="43 classes"):
        registry.prepare_from_image_folder("gtsrb", bad, data_dir, overwrite=True)


def test_missing_task_data_fails_fast_with_instructions(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(tfds_local.DatasetNotFoundError) as err:
        registry.load_task_split("sun397", "train", tmp_path)
    assert "prepare_from_hf('sun397'" in str(err.value) and "tanganke/sun397" in str(err.value)
    with pytest.raises(tfds_local.DatasetNotFoundError, match="tfds build mnist"):
        registry.load_task_split("mnist", "train", tmp_path)
    with pytest.raises(tfds_local.DatasetNotFoundError, match="offline"):
        registry.prepare_from_hf("gtsrb", tmp_path)  # conftest sets HF_*_OFFLINE
    assert time.monotonic() - t0 < 10
    _fake_task_dataset(tmp_path, "mnist", 9, 2, 10)  # one task present, the next one missing
    with pytest.raises(tfds_local.DatasetNotFoundError, match="task 'cifar10'"):
        calibration.sample_calibration(["mnist", "cifar10"], 4, tmp_path)


# ----------------------------------------------------------------------------- calibration


def test_calibration_indices_seeded_without_replacement():
    a = calibration.calibration_indices(1000, 100, seed=3, task="mnist")
    assert a.shape == (100,) and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, calibration.calibration_indices(1000, 100, seed=3, task="mnist"))
    assert not np.array_equal(a, calibration.calibration_indices(1000, 100, seed=4, task="mnist"))
    assert not np.array_equal(a, calibration.calibration_indices(1000, 100, seed=3, task="svhn"))
    np.testing.assert_array_equal(calibration.calibration_indices(7, 7), np.arange(7))
    for n in (0, 8):
        with pytest.raises(ValueError, match="Calibration size"):
            calibration.calibration_indices(7, n)
    # Uniform over positions: every index is drawn about equally often over many seeds.
    counts = np.bincount(np.concatenate([calibration.calibration_indices(20, 5, seed=s)
                                         for s in range(2000)]), minlength=20)
    np.testing.assert_allclose(counts / 2000, 5 / 20, atol=0.04)


def test_sample_calibration_reads_the_sampled_train_examples(tmp_path):
    mn = _fake_task_dataset(tmp_path, "mnist", 30, 5, 10, seed=1)
    sv = _fake_task_dataset(tmp_path, "svhn_cropped", 25, 5, 10, seed=2)
    got = calibration.sample_calibration(["mnist", "svhn"], 6, tmp_path, seed=9)
    again = calibration.sample_calibration(["svhn", "mnist"], 6, tmp_path, seed=9)
    for task, src in (("mnist", mn), ("svhn", sv)):
        idx = calibration.calibration_indices(len(src["train"]["label"]), 6, seed=9, task=task)
        np.testing.assert_array_equal(got[task]["image"], src["train"]["image"][idx])
        np.testing.assert_array_equal(got[task]["label"], src["train"]["label"][idx])
        np.testing.assert_array_equal(again[task]["image"], got[task]["image"])
    with pytest.raises(ValueError, match="Calibration size"):
        calibration.sample_calibration(["mnist"], 31, tmp_path)
