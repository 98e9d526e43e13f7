"""Tests for preparing task data from Hugging Face datasets (epmq_jax.data.registry / hf_stream).

Every source here is a small dataset the test writes itself, in the hub's layout (parquet files
under ``data/`` and a README whose YAML names the configs and splits, as FusionBench's datasets
on the hub have them) or with ``save_to_disk``; nothing reaches the network. References are
computed independently: PIL decoding of the source bytes, the head's class names, and the
documented validation draw.
"""

from __future__ import annotations

import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from epmq_jax.config import load_config  # noqa: E402
from epmq_jax.data import calibration, hf_stream, registry, tfds_local  # noqa: E402
from epmq_jax.models import templates  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------- the task table

# Transcribed from FusionBench (tanganke/fusion_bench), config/dataset/image_classification/
# {train,test}/<task>.yaml and fusion_bench/dataset/fer2013.py: (dataset id, config,
# train split, test split). The store's `test` must be the split FusionBench tests on.
FUSION_BENCH = {
    "sun397": ("tanganke/sun397", None, "train", "test"),
    "stanford_cars": ("tanganke/stanford_cars", None, "train", "test"),
    "resisc45": ("tanganke/resisc45", None, "train", "test"),
    "eurosat": ("tanganke/eurosat", None, "train", "test"),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "train", "test"),
    "gtsrb": ("tanganke/gtsrb", None, "train", "test"),
    "mnist": ("ylecun/mnist", None, "train", "test"),
    "dtd": ("tanganke/dtd", None, "train", "test"),
    "oxford_flowers102": ("dpdl-benchmark/oxford_flowers102", None, "train", "test"),
    "pcam": ("1aurent/PatchCamelyon", None, "train", "test"),
    "fer2013": ("clip-benchmark/wds_fer2013", None, "train", "test"),
    "oxford_iiit_pet": ("timm/oxford-iiit-pet", None, "train", "test"),
    "stl10": ("tanganke/stl10", None, "train", "test"),
    "cifar100": ("tanganke/cifar100", None, "train", "test"),
    "emnist_letters": ("tanganke/emnist_letters", None, "train", "test"),
    "kmnist": ("tanganke/kmnist", None, "train", "test"),
    "food101": ("ethz/food101", None, "train", "validation"),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", None, "train", "test"),
    "rendered_sst2": ("nateraw/rendered-sst2", None, "train", "test"),
    "cifar10": ("tanganke/cifar10", None, "train", "test"),
}


@pytest.mark.parametrize("tasks", [templates.TASKS_8, templates.TASKS_14, templates.TASKS_20],
                         ids=["8", "14", "20"])
def test_every_paper_task_has_fusion_bench_source_with_train_and_test(tasks):
    for task in tasks:
        spec = registry.get_task(task)
        repo, config, train, test = FUSION_BENCH[task]
        assert (spec.hf.repo, spec.hf.config) == (repo, config), task
        assert spec.hf.splits["train"] == train and spec.hf.splits["test"] == test, task
        if test != "test":  # a substitute split must say why
            assert spec.hf.note and test in spec.hf.note, task
        assert spec.num_classes == len(templates.task_prompts(task).classnames), task
    assert registry.get_task("pcam").hf.splits["validation"] == "valid"
    assert (registry.get_task("fer2013").hf.image_key,
            registry.get_task("fer2013").hf.label_key) == ("jpg", "cls")


def test_14_task_config_is_fusion_bench_tall14():
    cfg = load_config(CONFIGS / "clip_vit_b32_ta14.py")
    assert cfg.name == "clip_vit_b32_ta14"
    assert tuple(cfg.data.tasks) == templates.TASKS_14 and len(templates.TASKS_14) == 14
    assert set(cfg.model_pool.experts) == set(templates.TASKS_14)
    assert cfg.model_pool.experts["oxford_iiit_pet"] == "tanganke/clip-vit-base-patch32_oxford-iiit-pet"
    assert cfg.model_pool.experts["pcam"] == "tanganke/clip-vit-base-patch32_pcam"
    assert cfg.model_pool.base == "openai/clip-vit-base-patch32"
    doc = (CONFIGS / "clip_vit_b32_ta14.py").read_text().split('"""')[1]
    assert "epmq run --config configs/clip_vit_b32_ta14.py" in doc
    for name in ("clip_vit_b32_ta8", "clip_vit_b32_ta14", "clip_vit_l14_ta20"):
        doc = (CONFIGS / f"{name}.py").read_text().split('"""')[1]
        assert "registry.prepare_tasks" in doc, name  # how to get the data
    doc = (CONFIGS / "clip_vit_l14_ta20.py").read_text().split('"""')[1]
    assert "ethz/food101" in doc and "validation" in doc  # the substitute test split, said


# ----------------------------------------------------------------------------- fixtures


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(data: bytes) -> np.ndarray:
    """Independent reference: PIL's decoding of the source bytes, as RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def write_hub_repo(root: Path, splits: dict[str, tuple[list[bytes], list]], label_feature,
                   *, image_col="image", label_col="label", config="default",
                   shards: int = 1) -> Path:
    """A dataset repo as the hub holds it: ``data/<split>-0000i-of-0000n.parquet`` + README."""
    feats = datasets.Features({image_col: datasets.Image(), label_col: label_feature})
    yaml = [f"---\nconfigs:\n- config_name: {config}\n  data_files:"]
    for split, (images, labels) in splits.items():
        ds = datasets.Dataset.from_dict(
            {image_col: [{"bytes": b, "path": None} for b in images], label_col: labels},
            features=feats)
        k = min(shards, len(ds))
        for i in range(k):
            ds.shard(k, i, contiguous=True).to_parquet(
                root / "data" / config / f"{split}-{i:05d}-of-{k:05d}.parquet")
        yaml.append(f"  - split: {split}\n    path: data/{config}/{split}-*")
    (root / "README.md").write_text("\n".join(yaml) + "\n---\n")
    return root


def _mixed_images(rng, n):
    """Source bytes of every kind: JPEG RGB/grey, PNG RGB/grey (kept) and PNG palette/RGBA
    (converted). Returns the bytes and how many of them need converting."""
    kinds = [("JPEG", None), ("PNG", None), ("PNG", "L"), ("JPEG", "L"), ("PNG", "P"),
             ("PNG", "RGBA")]
    out, converted = [], 0
    for i in range(n):
        fmt, mode = kinds[i % len(kinds)]
        arr = rng.integers(0, 256, (6 + i % 3, 7, 3), dtype=np.uint8)
        out.append(_encode(arr, fmt, mode))
        converted += mode in ("P", "RGBA")
    return out, converted


@pytest.fixture
def counting(monkeypatch):
    """Records the rows of every DatasetWriter.add call and every PNG encoding."""
    seen = {"add": [], "png": 0}
    add, png = tfds_local.DatasetWriter.add, tfds_local._png_bytes

    def counting_add(self, split, examples):
        seen["add"].append((split, len(examples)))
        return add(self, split, examples)

    def counting_png(img):
        seen["png"] += 1
        return png(img)

    monkeypatch.setattr(tfds_local.DatasetWriter, "add", counting_add)
    monkeypatch.setattr(tfds_local, "_png_bytes", counting_png)
    return seen


# ----------------------------------------------------------------------------- preparation


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "arrow"])
def test_prepare_from_hf_streams_keeps_bytes_splits_and_reindexes_labels(
        tmp_path, monkeypatch, capsys, counting, streaming):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rng = np.random.default_rng(0)
    head = list(templates.task_prompts("eurosat").classnames)
    stored_names = head[::-1]  # the source orders its classes differently from the head
    n_train, n_test = 90, 25
    train_imgs, n_conv_train = _mixed_images(rng, n_train)
    test_imgs, n_conv_test = _mixed_images(rng, n_test)
    train_lab = rng.integers(0, 10, n_train).tolist()
    test_lab = rng.integers(0, 10, n_test).tolist()
    repo = write_hub_repo(tmp_path / "repo", {"train": (train_imgs, train_lab),
                                              "test": (test_imgs, test_lab)},
                          datasets.ClassLabel(names=stored_names))
    capsys.readouterr()
    counting["png"] = 0
    data_dir = tmp_path / "data"
    out = registry.prepare_from_hf("eurosat", data_dir, source=repo, streaming=streaming,
                                   batch_size=16)
    assert out == data_dir / "epmq_eurosat" / "1.0.0"

    # Batches: no call ever wrote more rows than one batch; nothing was re-encoded but the
    # palette/RGBA images.
    assert counting["add"] and max(n for _, n in counting["add"]) <= 16
    assert counting["png"] == n_conv_train + n_conv_test
    # Progress bars, one per split, counting every image.
    err = capsys.readouterr().err
    assert "eurosat train->train" in err and "eurosat test->test" in err
    assert f"{n_train}" in err and f"{n_test}" in err

    # Splits as the source has them (sizes, order, pixels); labels in the head's order.
    to_head = {i: head.index(name) for i, name in enumerate(stored_names)}
    for split, imgs, labs in (("train", train_imgs, train_lab), ("test", test_imgs, test_lab)):
        got = registry.load_task_split("eurosat", split, data_dir)
        assert len(got["image"]) == len(imgs) == registry.split_size("eurosat", split, data_dir)
        for a, b in zip(got["image"], imgs):
            np.testing.assert_array_equal(a, _rgb(b))
        np.testing.assert_array_equal(got["label"], [to_head[v] for v in labs])
    # No validation split in the source: the documented seeded draw of train, in order.
    mask = np.random.default_rng(registry.VALIDATION_SEED).random(n_train) < 0.1
    val = registry.load_task_split("eurosat", "validation", data_dir)
    assert 0 < mask.sum() == len(val["image"])
    np.testing.assert_array_equal(val["label"], np.array([to_head[v] for v in train_lab])[mask])
    for a, b in zip(val["image"], np.array(train_imgs, dtype=object)[mask]):
        np.testing.assert_array_equal(a, _rgb(b))

    # Calibration reads the store: n seeded train examples.
    cal = calibration.sample_calibration(["eurosat"], 7, data_dir, seed=4)["eurosat"]
    idx = calibration.calibration_indices(n_train, 7, seed=4, task="eurosat")
    np.testing.assert_array_equal(cal["label"], [to_head[train_lab[i]] for i in idx])
    for a, i in zip(cal["image"], idx):
        np.testing.assert_array_equal(a, _rgb(train_imgs[i]))


def test_prepare_from_hf_memory_is_bounded_by_the_batch(tmp_path, monkeypatch):
    """A few thousand images: the Python heap never holds more than a batch or so of them.

    The source has 20 parquet shards, as hub datasets do; pyarrow may buffer a byte range of the
    file it reads (at most one shard here; 32 MB ranges on the hub), never the split.
    """
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rng = np.random.default_rng(1)
    n = 2000
    imgs = [_encode(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), "PNG") for _ in range(n)]
    total = sum(map(len, imgs))  # ~3.6 MB of PNG bytes
    repo = write_hub_repo(tmp_path / "repo", {"train": (imgs, rng.integers(0, 10, n).tolist()),
                                              "test": (imgs[:50], [0] * 50)},
                          datasets.ClassLabel(num_classes=10), shards=20)

    def peak(fn):
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    tiny = write_hub_repo(tmp_path / "tiny", {"train": (imgs[:20], [0] * 20),
                                              "test": (imgs[:2], [0] * 2)},
                          datasets.ClassLabel(num_classes=10))
    del imgs

    def prepare(source, streaming):
        registry.prepare_from_hf("mnist", tmp_path / "data", source=source, streaming=streaming,
                                 batch_size=32, overwrite=True)

    for streaming in (True, False):
        prepare(tiny, streaming)  # imports happen here, outside the measure
        used = peak(lambda: prepare(repo, streaming))  # noqa: B023
        assert used < total / 4, (streaming, used, total)
        print("MEM", streaming, used, total)
    assert registry.split_size("mnist", "train", tmp_path / "data") == n
    # The measure sees image bytes: holding the split's images takes about their total size.
    whole = peak(lambda: [x["bytes"] for x in datasets.load_dataset(
        str(repo), split="train").cast_column("image", datasets.Image(decode=False))["image"]])
    assert whole > 0.9 * total


def test_source_validation_split_bool_labels_and_webdataset_columns(tmp_path, capsys):
    rng = np.random.default_rng(2)

    def part(n):
        return ([_encode(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), "PNG")
                 for _ in range(n)], [bool(b) for b in rng.integers(0, 2, n)])

    # PCam on the hub: splits train/valid/test, label a bool (no ClassLabel).
    src = {"train": part(12), "valid": part(5), "test": part(6)}
    repo = write_hub_repo(tmp_path / "pcam", src, datasets.Value("bool"))
    registry.prepare_from_hf("pcam", tmp_path / "data", source=repo, batch_size=4)
    for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
        got = registry.load_task_split("pcam", split, tmp_path / "data")
        np.testing.assert_array_equal(got["label"], np.array(src[name][1], np.int64))
        for a, b in zip(got["image"], src[name][0]):
            np.testing.assert_array_equal(a, _rgb(b))
    assert "pcam valid->validation" in capsys.readouterr().err

    # FER2013 as FusionBench loads it: a webdataset with columns jpg / cls (plain ints).
    fer = {s: ([_encode(rng.integers(0, 256, (8, 8), dtype=np.uint8), "JPEG") for _ in range(k)],
               rng.integers(0, 7, k).tolist()) for s, k in (("train", 40), ("test", 9))}
    repo = write_hub_repo(tmp_path / "fer", fer, datasets.Value("int64"), image_col="jpg",
                          label_col="cls")
    registry.prepare_from_hf("fer2013", tmp_path / "data", source=repo)
    got = registry.load_task_split("fer2013", "test", tmp_path / "data")
    np.testing.assert_array_equal(got["label"], fer["test"][1])
    assert got["image"].shape == (9, 8, 8, 3)  # grey JPEG stored as is, read as RGB
    np.testing.assert_array_equal(got["image"][0], _rgb(fer["test"][0][0]))


def test_save_to_disk_source_and_substitute_test_split(tmp_path):
    rng = np.random.default_rng(3)
    names = [n.replace(" ", "_") for n in templates.task_prompts("food101").classnames]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def part(n):
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": _encode(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "JPEG"),
                        "path": None} for _ in range(n)],
             "label": rng.integers(0, 101, n).tolist()}, features=feats)

    # ethz/food101's splits: train and validation (the official test set); no test.
    dd = datasets.DatasetDict({"train": part(40), "validation": part(8)})
    dd.save_to_disk(str(tmp_path / "food"))
    registry.prepare_from_hf("food101", tmp_path / "data", source=tmp_path / "food")
    got = registry.load_task_split("food101", "test", tmp_path / "data")
    np.testing.assert_array_equal(got["label"], dd["validation"]["label"])
    assert registry.split_size("food101", "train", tmp_path / "data") == 40


def test_prepare_errors_are_clear_and_come_before_writing(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    imgs = [_encode(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "PNG") for _ in range(30)]
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="Unknown task"):
        registry.prepare_from_hf("imagenet21k", data_dir)
    t0 = time.monotonic()
    with pytest.raises(tfds_local.DatasetNotFoundError, match="offline"):
        registry.prepare_from_hf("sun397", data_dir)  # a hub id while HF is offline
    assert time.monotonic() - t0 < 10
    only_train = write_hub_repo(tmp_path / "only_train", {"train": (imgs, [0] * 30)},
                                datasets.ClassLabel(num_classes=10))
    with pytest.raises(ValueError, match="no split 'test'"):
        registry.prepare_from_hf("mnist", data_dir, source=only_train)
    wrong = write_hub_repo(tmp_path / "wrong", {"train": (imgs, [0] * 30), "test": (imgs, [0] * 30)},
                           datasets.ClassLabel(num_classes=3))
    with pytest.raises(ValueError, match="3 classes; task 'mnist' has 10"):
        registry.prepare_from_hf("mnist", data_dir, source=wrong)
    out_of_range = write_hub_repo(tmp_path / "oor", {"train": (imgs, [12] * 30),
                                                     "test": (imgs, [0] * 30)},
                                  datasets.Value("int64"))
    with pytest.raises(ValueError, match=r"label 12 .* outside \[0, 10\)"):
        registry.prepare_from_hf("mnist", data_dir, source=out_of_range)
    no_image = tmp_path / "no_image"
    write_hub_repo(no_image, {"train": (imgs, [0] * 30), "test": (imgs, [0] * 30)},
                   datasets.ClassLabel(num_classes=10), image_col="pixels")
    with pytest.raises(ValueError, match="no image column"):
        registry.prepare_from_hf("mnist", data_dir, source=no_image)
    assert not (data_dir / "epmq_mnist").exists()  # every failure left nothing behind
    assert not list(data_dir.glob(".*incomplete*"))
    good = write_hub_repo(tmp_path / "good", {"train": (imgs, [1] * 30), "test": (imgs, [2] * 30)},
                          datasets.ClassLabel(num_classes=10))
    registry.prepare_from_hf("mnist", data_dir, source=good)
    monkeypatch.setattr(hf_stream, "open_split", None)  # must not be reached
    with pytest.raises(FileExistsError, match="overwrite=True"):
        registry.prepare_from_hf("mnist", data_dir, source=good)
    # prepare_tasks prepares what is missing only (here: nothing, and it never goes online).
    assert registry.prepare_tasks(["mnist"], data_dir) == []


def test_hf_stream_batches_never_exceed_batch_size(tmp_path):
    rng = np.random.default_rng(5)
    imgs = [_encode(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8), "PNG") for _ in range(23)]
    repo = write_hub_repo(tmp_path / "r", {"train": (imgs, list(range(23)))},
                          datasets.Value("int64"))
    for streaming in (True, False):
        ds, total = hf_stream.open_split(repo, "train", streaming=streaming)
        sizes, seen = [], []
        for b in hf_stream.iter_batches(ds, ["image", "label"], 5, image_columns=["image"]):
            sizes.append(len(b["label"]))
            seen += b["image"]
        assert sizes == [5, 5, 5, 5, 3] and seen == imgs
        assert total in (None, 23)
    with pytest.raises(ValueError, match="batch_size"):
        next(hf_stream.iter_batches(ds, ["label"], 0))


# ----------------------------------------------------------------------------- GLUE


def test_glue_prepare_streams_what_load_examples_reads(tmp_path, capsys):
    from epmq_jax.data import glue

    with pytest.raises(tfds_local.DatasetNotFoundError, match="offline"):
        glue.prepare_from_hf("rte", tmp_path / "data")
    repo = tmp_path / "glue"
    yaml = ["---\nconfigs:\n- config_name: rte\n  data_files:"]
    feats = datasets.Features({"sentence1": datasets.Value("string"),
                               "sentence2": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                               "idx": datasets.Value("int32")})
    rows = {"train": 11, "validation": 5, "test": 3}
    for split, k in rows.items():
        datasets.Dataset.from_dict(
            {"sentence1": [f"{split} premise {i} é" for i in range(k)],
             "sentence2": [f"{split} hypothesis {i}" for i in range(k)],
             "label": [-1] * k if split == "test" else [i % 2 for i in range(k)],
             "idx": list(range(k))}, features=feats).to_parquet(
                 repo / "rte" / f"{split}-00000-of-00001.parquet")
        yaml.append(f"  - split: {split}\n    path: rte/{split}-*")
    (repo / "README.md").write_text("\n".join(yaml) + "\n---\n")
    capsys.readouterr()
    glue.prepare_from_hf("rte", tmp_path / "data", source=repo, batch_size=4)
    assert "glue/rte train" in capsys.readouterr().err
    val = glue.load_examples("rte", None, tmp_path / "data")
    assert list(val["sentence1"]) == [f"validation premise {i} é" for i in range(5)]
    assert list(val["label"]) == [0, 1, 0, 1, 0]
    assert len(glue.load_examples("rte", "train", tmp_path / "data")["label"]) == 11
    with pytest.raises(ValueError, match="no split 'test'"):  # GLUE's hidden test is not kept
        glue.load_examples("rte", "test", tmp_path / "data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        glue.prepare_from_hf("rte", tmp_path / "data", source=repo)
