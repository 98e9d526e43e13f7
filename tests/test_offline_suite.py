"""The offline suite: sources, per-task domains and labels, splits, calibration sampling.

References are independent: pixel loops written out here, MNIST's documented class counts,
and a lookup of every transformed image's source image by its bytes.
"""

import ml_collections
import numpy as np
import pytest

from epmq_jax.data import offline_suite as osuite


def _cfg(tasks, **kw):
    d = dict(tasks=list(tasks), n_train=60, n_val=20, n_test=30, seed=3, pretrain_n=50)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def test_mnist_matches_documented_class_counts():
    data = osuite.load_mnist()
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (60000, 28, 28) and xtr.dtype == np.uint8
    assert xte.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(ytr),
                                  [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    np.testing.assert_array_equal(np.bincount(yte),
                                  [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


def test_optdigits_sizes_and_range():
    d = osuite.load_optdigits()
    assert d["train"][0].shape == (3823, 8, 8) and d["test"][0].shape == (1797, 8, 8)
    assert d["train"][0].max() == 16 and d["test"][1].max() == 9


def test_pixel_transforms_against_loops():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    rot, inv, flip = osuite.rotate(x, 1), osuite.invert(x), osuite.flip_horizontal(x)
    perm = osuite.block_permutation(49, 7)
    shuf = osuite.shuffle_blocks(x, 4, perm)
    for n in range(3):
        for r in range(28):
            for c in range(28):
                assert rot[n, r, c] == x[n, c, 27 - r]  # 90 degrees counter-clockwise
                assert int(inv[n, r, c]) == 255 - int(x[n, r, c])
                assert flip[n, r, c] == x[n, r, 27 - c]
                tile = perm[(r // 4) * 7 + c // 4]
                assert shuf[n, r, c] == x[n, (tile // 7) * 4 + r % 4, (tile % 7) * 4 + c % 4]
    assert sorted(perm) == list(range(49))


def test_upscale_digits_against_loop():
    x = np.random.default_rng(1).integers(0, 17, (2, 8, 8)).astype(np.uint8)
    up = osuite.upscale_digits(x)
    assert up.shape == (2, 28, 28) and up.dtype == np.uint8
    ref = np.zeros((2, 28, 28), np.uint8)
    for n in range(2):
        for i in range(8):
            for j in range(8):
                ref[n, 2 + 3 * i: 5 + 3 * i, 2 + 3 * j: 5 + 3 * j] = round(int(x[n, i, j]) * 255 / 16)
    np.testing.assert_array_equal(up, ref)
    with pytest.raises(ValueError, match="8, 8"):
        osuite.upscale_digits(np.zeros((1, 28, 28), np.uint8))


def test_noise_statistics():
    x = np.full((200, 28, 28), 128, np.uint8)
    y = osuite.add_noise(x, 0.1, np.random.default_rng(0)).astype(np.float64)
    assert abs(y.mean() - 128) < 0.5
    assert abs(y.std() - 25.5) < 0.5


def test_elastic_limits():
    x = np.random.default_rng(2).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(osuite.elastic(x, 0.0, 4.0, np.random.default_rng(0)), x)
    y = osuite.elastic(x, 34.0, 4.0, np.random.default_rng(0))
    assert y.shape == x.shape and not np.array_equal(x, y)


# Inverse of each deterministic transform, applied to the task's images, must give back a
# source image (looked up by its bytes) whose label maps to the task's label.
_INVERSES = {
    "mnist": (lambda x: x, lambda y: y),
    "mnist_inverted": (lambda x: 255 - x, lambda y: y),
    "mnist_rot90": (lambda x: np.rot90(x, k=-1, axes=(1, 2)), lambda y: y),
    "mnist_flip_parity": (lambda x: x[:, :, ::-1], lambda y: y % 2),
    "mnist_block_shuffle": (
        lambda x: osuite.shuffle_blocks(
            x, 4, np.argsort(osuite.block_permutation(49, osuite._BLOCK_PERM_SEED))),
        lambda y: y),
}


@pytest.mark.parametrize("name", sorted(_INVERSES))
def test_mnist_task_domains_and_labels(name):
    suite = osuite.build_suite(_cfg([name]))
    task = suite[name]
    inverse, label_map = _INVERSES[name]
    src = osuite.load_mnist()
    lookup = {split: {img.tobytes(): lab for img, lab in zip(*src[split])}
              for split in ("train", "test")}
    seen = {}
    for split, n in (("train", 60), ("validation", 20), ("test", 30)):
        x, y = task.splits[split]
        assert x.shape == (n, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
        raw = np.ascontiguousarray(inverse(x[..., 0]))
        table = lookup["test" if split == "test" else "train"]
        labels = np.array([table[r.tobytes()] for r in raw])  # KeyError: not a source image
        np.testing.assert_array_equal(y, label_map(labels))
        seen[split] = {r.tobytes() for r in raw}
    assert not seen["train"] & seen["validation"]
    assert task.num_classes == (2 if name == "mnist_flip_parity" else 10)


def test_digits_task_comes_from_optdigits():
    task = osuite.build_suite(_cfg(["digits_upscaled"]))["digits_upscaled"]
    src = osuite.load_optdigits()
    for split, source in (("train", "train"), ("validation", "train"), ("test", "test")):
        x, y = task.splits[split]
        small = x[:, 2:26:3, 2:26:3, 0]  # top-left pixel of every 3x3 tile
        table = {img.tobytes(): lab for img, lab in
                 zip(osuite.upscale_digits(src[source][0]), src[source][1])}
        np.testing.assert_array_equal(y, [table[img.tobytes()] for img in x[..., 0]])
        assert small.max() <= 255


def test_elastic_shift_labels_and_noise_task():
    suite = osuite.build_suite(_cfg(["mnist_elastic_shift", "mnist_noise"]))
    x, y = suite["mnist_elastic_shift"].test
    assert set(np.unique(y)) <= set(range(10))
    xn, _ = suite["mnist_noise"].test
    # Heavy noise: the background (zero in MNIST) now has a large spread.
    assert xn.astype(np.float64).std() > 80


def test_build_is_deterministic_and_seeded():
    a = osuite.build_suite(_cfg(["mnist_noise"]))["mnist_noise"].train[0]
    b = osuite.build_suite(_cfg(["mnist_noise"]))["mnist_noise"].train[0]
    c = osuite.build_suite(_cfg(["mnist_noise"], seed=4))["mnist_noise"].train[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        osuite.build_suite(_cfg(["nope"]))
    with pytest.raises(ValueError, match="duplicates"):
        osuite.build_suite(_cfg(["mnist", "mnist"]))
    with pytest.raises(ValueError, match="n_val=0"):
        osuite.build_suite(_cfg(["mnist"], n_val=0))


def test_calibration_images_come_from_train():
    suite = osuite.build_suite(_cfg(["mnist", "mnist_rot90"]))
    calib = osuite.calibration_images(suite, 16, seed=1)
    assert list(calib) == ["mnist", "mnist_rot90"]
    for name, imgs in calib.items():
        assert imgs.shape == (16, 28, 28, 1)
        train = {r.tobytes() for r in suite[name].train[0]}
        assert all(r.tobytes() in train for r in imgs)
        assert len({r.tobytes() for r in imgs}) == 16  # without replacement
    assert osuite.calibration_images(suite, 1000)["mnist"].shape[0] == 60


def test_pretrain_data_and_to_float():
    x, y = osuite.pretrain_data(_cfg(["mnist"]))
    assert x.shape == (50, 28, 28, 1) and y.shape == (50,)
    f = osuite.to_float(np.array([0, 255], np.uint8))
    np.testing.assert_allclose(f, [-1.0, 1.0])


def test_tfds_round_trip_equals_in_memory(tmp_path):
    cfg = _cfg(["mnist_rot90", "mnist_flip_parity"])
    mem = osuite.build_suite(cfg)
    via_tfds = osuite.build_suite(cfg, data_dir=str(tmp_path))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2  # one directory per task's data key
    again = osuite.build_suite(cfg, data_dir=str(tmp_path))  # read back, nothing rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == written
    for a, b, c in zip(mem.tasks, via_tfds.tasks, again.tasks):
        assert a.name == b.name and a.num_classes == b.num_classes
        for split in osuite.SPLITS:
            for u, v, w in zip(a.splits[split], b.splits[split], c.splits[split]):
                assert u.dtype == v.dtype
                np.testing.assert_array_equal(u, v)
                np.testing.assert_array_equal(u, w)


# ----------------------------------------------------------------------------- broad pretraining


def _broad(tasks, **kw):
    return _cfg(tasks, **{"regime": "broad", "pretrain_n": 96, "pretrain_clusters": 4, **kw})


def _shuffled_labels(load):
    """A source loader whose labels are permuted: data that reads labels changes with it."""
    def fake():
        out = {}
        for split, (x, y) in load().items():
            out[split] = (x, np.random.default_rng(0).permutation(y))
        return out
    return fake


@pytest.mark.parametrize("regime", ["narrow", "broad"])
def test_broad_pretraining_reads_no_label(monkeypatch, regime):
    cfg = _broad(["mnist", "mnist_flip_parity", "mnist_elastic_shift", "digits_upscaled"])
    cfg.regime = regime
    x, y = osuite.pretrain_data(cfg)
    monkeypatch.setattr(osuite, "load_mnist", _shuffled_labels(osuite.load_mnist))
    monkeypatch.setattr(osuite, "load_optdigits", _shuffled_labels(osuite.load_optdigits))
    x2, y2 = osuite.pretrain_data(cfg)
    np.testing.assert_array_equal(x, x2)
    if regime == "narrow":  # plain digits with their labels: the check sees labels change
        assert not np.array_equal(y, y2)
    else:
        np.testing.assert_array_equal(y, y2)
        assert osuite.pretrain_num_classes(cfg) == 4 and set(np.unique(y)) <= set(range(4))


def test_broad_pretraining_renders_unused_images_in_every_domain():
    tasks = ["mnist", "mnist_inverted", "mnist_rot90", "mnist_block_shuffle"]
    cfg = _broad(tasks)
    x, y = osuite.pretrain_data(cfg)
    assert x.shape == (96, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    src_x = osuite.load_mnist()["train"][0]
    index = {img.tobytes(): i for i, img in enumerate(src_x)}
    suite = osuite.build_suite(cfg)
    task_images = set()  # every task image, mapped back to its plain source image
    for name in tasks:
        for split in ("train", "validation"):
            raw = np.ascontiguousarray(_INVERSES[name][0](suite[name].splits[split][0][..., 0]))
            task_images |= {r.tobytes() for r in raw}
    source, domain = np.full(96, -1), np.full(96, -1)
    for d, name in enumerate(tasks):  # each image is exactly one domain's rendering of a source
        raw = np.ascontiguousarray(_INVERSES[name][0](x[..., 0]))
        for i, r in enumerate(raw):
            if r.tobytes() in index:
                assert source[i] == -1
                source[i], domain[i] = index[r.tobytes()], d
    assert (source >= 0).all() and len(set(source)) == 96
    assert np.bincount(domain).tolist() == [24] * 4  # the domains in turn
    assert not {src_x[i].tobytes() for i in source} & task_images  # no task image is reused
    order = np.argsort(source)  # labels: the clusters of the plain sources, by source index
    clusters = osuite.content_clusters(src_x[np.sort(source)], 4, cfg.seed)
    np.testing.assert_array_equal(y[order], clusters)
    # the other label kinds: the same images, with the domain as a second column or folded in
    cfg.pretrain_labels = "content+domain"
    x2, y2 = osuite.pretrain_data(cfg)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, np.stack([y, domain], axis=1))
    assert osuite.pretrain_num_classes(cfg) == (4, 4)
    cfg.pretrain_labels = "joint"
    np.testing.assert_array_equal(osuite.pretrain_data(cfg)[1], domain * 4 + y)
    assert osuite.pretrain_num_classes(cfg) == 16
    cfg.pretrain_labels = "captions"
    with pytest.raises(ValueError, match="suite.pretrain_labels='captions'"):
        osuite.pretrain_data(cfg)


def test_broad_pretraining_draws_upscaled_digits_from_mnist():
    cfg = _broad(["mnist", "digits_upscaled"], pretrain_n=20)
    x, _ = osuite.pretrain_data(cfg)
    src_x = osuite.load_mnist()["train"][0]
    plain = {img.tobytes() for img in src_x}
    upscaled = [i for i in range(20) if x[i, ..., 0].tobytes() not in plain]
    assert len(upscaled) == 10  # the other half are plain MNIST images
    small = x[upscaled, 2:26:3, 2:26:3, 0]  # one pixel per 3x3 tile: the 8x8 digit, 0..255
    counts = np.rint(small.astype(np.float64) * 16 / 255).astype(np.uint8)
    np.testing.assert_array_equal(osuite.upscale_digits(counts), x[upscaled, ..., 0])
    table = {c.tobytes() for c in osuite.mnist_to_optdigits(src_x)}  # checked against a loop below
    assert all(c.tobytes() in table for c in counts)  # an MNIST image made into an 8x8 digit


def test_mnist_to_optdigits_against_loop():
    x = np.random.default_rng(3).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    out = osuite.mnist_to_optdigits(x)
    assert out.shape == (2, 8, 8) and out.dtype == np.uint8
    big = np.zeros((2, 32, 32), bool)
    big[:, 2:30, 2:30] = x >= 128
    for n in range(2):
        for i in range(8):
            for j in range(8):
                assert out[n, i, j] == big[n, 4 * i: 4 * i + 4, 4 * j: 4 * j + 4].sum()
    with pytest.raises(ValueError, match="28, 28"):
        osuite.mnist_to_optdigits(np.zeros((1, 8, 8), np.uint8))


def test_content_clusters_recovers_separated_groups():
    rng = np.random.default_rng(0)
    levels = np.repeat([10, 120, 240], 30)  # three groups of flat images, slightly noisy
    imgs = np.clip(levels[:, None, None] + rng.integers(-5, 6, (90, 8, 8)), 0, 255).astype(np.uint8)
    ids = osuite.content_clusters(imgs, 3, seed=0)
    assert ids.dtype == np.int32
    for g in range(3):  # one cluster per group, three distinct clusters
        assert len(set(ids[30 * g: 30 * g + 30])) == 1
    assert len(set(ids)) == 3


def test_pretrain_spec_and_bad_regime():
    narrow, broad = _cfg(["mnist"]), _broad(["mnist"])
    assert osuite.pretrain_spec(narrow) == {"regime": "narrow", "pretrain_n": 50, "seed": 3}
    assert osuite.pretrain_spec(broad)["regime"] == "broad"
    assert osuite.pretrain_spec(broad) != osuite.pretrain_spec(_broad(["mnist", "mnist_noise"]))
    with pytest.raises(ValueError, match="suite.regime='wide'"):
        osuite.pretrain_data(_cfg(["mnist"], regime="wide"))
    with pytest.raises(ValueError, match="pretrain_n=100000"):
        osuite.pretrain_data(_broad(["mnist"], pretrain_n=100_000))
    with pytest.raises(ValueError, match="suite.pretrain_clusters=1: "):
        osuite.pretrain_data(_broad(["mnist"], pretrain_clusters=1))


def test_broad_config_changes_only_pretraining_and_finetuning():
    from pathlib import Path

    from epmq_jax.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    for size in ("full", "small", "tiny"):
        narrow = load_config(f"{configs / 'offline_8task.py'}:{size}").to_dict()
        broad = load_config(f"{configs / 'offline_8task_broad.py'}:{size}").to_dict()
        assert narrow["suite"]["regime"] == "narrow" and broad["suite"]["regime"] == "broad"
        osuite.pretrain_spec(ml_collections.ConfigDict(broad["suite"]))  # valid broad keys
        assert narrow["run"]["companions"] == ("offline_8task_broad.py",)  # the main job runs both
        assert broad["run"]["companions"] == ()                          # and nothing recurses
        for c in (narrow, broad):
            for key in ("name", "description"):
                c.pop(key)
            for key in ("companions", "source"):
                c["run"].pop(key)
            for key in ("regime", "pretrain_n", "pretrain_clusters", "pretrain_labels"):
                c["suite"].pop(key, None)
            for key in ("pretrain", "finetune", "multitask"):
                c["train"].pop(key)
        assert narrow == broad  # same tasks, splits, model, heads, merges, quantizers, rows
