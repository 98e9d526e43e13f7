"""The task registry: each CLIP image task -> where its data lives and how to read it.

A :class:`TaskSpec` gives the tensorflow-datasets (tfds) name, the splits used for calibration
(``train``) and evaluation (``test``), the feature keys and the class count. Task names and the
8/14/20-task sets are those of ``epmq_jax.models.templates`` (the zero-shot heads), so a task's
labels index its head's classes.

Where the data come from, in order (:func:`resolve_task`):

1. the tfds dataset ``spec.tfds_name`` prepared under ``data_dir`` in array_record format
   (``tfds build NAME --file_format=array_record --data_dir DATA_DIR`` on a machine with
   network);
2. a local dataset ``epmq_<task>`` under ``data_dir`` with splits ``train``/``test``
   (``validation`` optional), written by :func:`prepare_from_image_folder` or, when online,
   :func:`prepare_from_hf` (the fallback for tasks tfds lacks: GTSRB, FER2013, Rendered SST-2).

Nothing is downloaded implicitly: a task whose data are absent raises
``DatasetNotFoundError`` at once, saying what was looked for and how to prepare it.

Label orders: labels are returned as indices of the task's zero-shot head
(``epmq_jax.models.templates``, torchvision / FusionBench order). When the stored ``ClassLabel``
names match the head's class names one to one (after lower-casing, dropping SUN397's ``/a/``
prefix and all non-alphanumerics), labels are re-indexed by name: this matters for Food-101 and
SUN397, where tfds orders two classes differently (``cheesecake``/``cheese_plate``,
``jail/indoor``/``jail_cell``). Otherwise stored labels are used as they are, plus
``label_offset`` (EMNIST letters are 1..26 in tfds, 0..25 in the head); for those tasks
(EuroSAT, KMNIST, CIFAR, STL-10, PCam, ...) the tfds order was checked by eye against the head's
names where tfds' metadata has them. Splits that tfds lacks are carved deterministically from
``train`` (RESISC45, EuroSAT); they are not the literature's split files.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from epmq_jax.data.tfds_local import (
    DatasetNotFoundError,
    dataset_exists,
    features_of,
    load_split,
    write_local_dataset,
)
from epmq_jax.models.templates import TASKS_8, TASKS_14, TASKS_20, task_prompts

__all__ = ["TASKS", "TASKS_8", "TASKS_14", "TASKS_20", "TaskSpec", "get_task",
           "label_permutation", "load_task_split", "local_name", "prepare_from_hf",
           "prepare_from_image_folder", "resolve_task"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where one task's data live.

    Attributes:
      name: the registry key (also the zero-shot head's key), e.g. ``"stanford_cars"``.
      num_classes: number of classes of the head.
      tfds_name: tfds name with config (``"eurosat/rgb"``), or None when tfds lacks the task.
      splits: ``{"train": ..., "test": ..., ["validation": ...]}``: tfds split strings
        (slicing allowed) used when the data come from ``tfds_name``.
      image_key, label_key: feature names in the tfds dataset.
      label_offset: added to stored labels to get head indices.
      hf_dataset: Hugging Face datasets id for :func:`prepare_from_hf` (FusionBench's copies
        where known; the ids could not be checked offline).
      hf_config: the Hugging Face dataset config, if it needs one.
    """

    name: str
    num_classes: int
    tfds_name: str | None
    splits: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"train": "train", "test": "test"})
    image_key: str = "image"
    label_key: str = "label"
    label_offset: int = 0
    hf_dataset: str | None = None
    hf_config: str | None = None


def _spec(name: str, n: int, tfds_name: str | None, **kw: Any) -> TaskSpec:
    return TaskSpec(name=name, num_classes=n, tfds_name=tfds_name, **kw)


_TASK_LIST = [
    _spec("sun397", 397, "sun397/tfds",
          splits={"train": "train", "validation": "validation", "test": "test"},
          hf_dataset="tanganke/sun397"),
    _spec("stanford_cars", 196, "cars196", hf_dataset="tanganke/stanford_cars"),
    # tfds has one RESISC45 split: 60/20/20 by position.
    _spec("resisc45", 45, "resisc45",
          splits={"train": "train[:60%]", "validation": "train[60%:80%]", "test": "train[80%:]"},
          hf_dataset="tanganke/resisc45"),
    # tfds has one EuroSAT split: 80/10/10 by position.
    _spec("eurosat", 10, "eurosat/rgb",
          splits={"train": "train[:80%]", "validation": "train[80%:90%]", "test": "train[90%:]"},
          hf_dataset="tanganke/eurosat"),
    _spec("svhn", 10, "svhn_cropped", hf_dataset="svhn", hf_config="cropped_digits"),
    _spec("gtsrb", 43, None, hf_dataset="tanganke/gtsrb"),
    _spec("mnist", 10, "mnist", hf_dataset="mnist"),
    _spec("dtd", 47, "dtd", splits={"train": "train", "validation": "validation", "test": "test"},
          hf_dataset="tanganke/dtd"),
    _spec("oxford_flowers102", 102, "oxford_flowers102",
          splits={"train": "train", "validation": "validation", "test": "test"},
          hf_dataset="dpdl-benchmark/oxford_flowers102"),
    _spec("pcam", 2, "patch_camelyon",
          splits={"train": "train", "validation": "validation", "test": "test"},
          hf_dataset="tanganke/pcam"),
    _spec("fer2013", 7, None, hf_dataset="tanganke/fer2013"),
    _spec("oxford_iiit_pet", 37, "oxford_iiit_pet", hf_dataset="timm/oxford-iiit-pet"),
    _spec("stl10", 10, "stl10", hf_dataset="tanganke/stl10"),
    _spec("cifar100", 100, "cifar100", hf_dataset="cifar100"),
    _spec("emnist_letters", 26, "emnist/letters", label_offset=-1,
          hf_dataset="tanganke/emnist_letters"),
    _spec("kmnist", 10, "kmnist", hf_dataset="tanganke/kmnist"),
    # tfds calls Food-101's official test split "validation".
    _spec("food101", 101, "food101", splits={"train": "train", "test": "validation"},
          hf_dataset="ethz/food101"),
    _spec("fashion_mnist", 10, "fashion_mnist", hf_dataset="zalando-datasets/fashion_mnist"),
    _spec("rendered_sst2", 2, None, hf_dataset="nateraw/rendered-sst2"),
    _spec("cifar10", 10, "cifar10", hf_dataset="cifar10"),
]

#: All registered tasks by name.
TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASK_LIST}

#: Other names users type for the same tasks.
ALIASES = {"cars": "stanford_cars", "flowers102": "oxford_flowers102", "pets": "oxford_iiit_pet",
           "svhn_cropped": "svhn", "patch_camelyon": "pcam", "emnist": "emnist_letters",
           "rendered-sst2": "rendered_sst2"}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a task name or alias (``"cars"`` -> ``"stanford_cars"``).

    Raises:
      ValueError: unknown task (the message lists the known ones).
    """
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise ValueError(f"Unknown task {name!r}; known tasks: {sorted(TASKS)} "
                         f"(aliases: {sorted(ALIASES)}).")
    return TASKS[key]


def local_name(task: str) -> str:
    """Name of the fallback local tfds dataset of a task: ``"epmq_<task>"``."""
    return f"epmq_{get_task(task).name}"


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """Where :func:`resolve_task` found a task: tfds dataset name and the split strings."""

    dataset: str
    splits: dict[str, str]
    image_key: str
    label_key: str


def resolve_task(task: str, data_dir: str | os.PathLike) -> TaskSource:
    """Finds the prepared data of ``task`` under ``data_dir`` (see the module doc for the order).

    Raises:
      DatasetNotFoundError: neither the tfds dataset nor the local fallback is there. Checks only
        the file system, so it fails at once.
    """
    spec = get_task(task)
    if spec.tfds_name and dataset_exists(spec.tfds_name, data_dir):
        return TaskSource(spec.tfds_name, dict(spec.splits), spec.image_key, spec.label_key)
    local = local_name(spec.name)
    if dataset_exists(local, data_dir):
        splits = {s: s for s in ("train", "validation", "test")}
        return TaskSource(local, splits, "image", "label")
    how = [f"`tfds build {spec.tfds_name} --file_format=array_record --data_dir {data_dir}`"
           ] if spec.tfds_name else [f"(tfds has no {spec.name})"]
    how.append(f"epmq_jax.data.registry.prepare_from_image_folder('{spec.name}', ROOT, data_dir)")
    if spec.hf_dataset:
        how.append(f"epmq_jax.data.registry.prepare_from_hf('{spec.name}', data_dir) when online "
                   f"(Hugging Face '{spec.hf_dataset}')")
    looked = ([f"{spec.tfds_name} (tfds, array_record)"] if spec.tfds_name else []) + [local]
    raise DatasetNotFoundError(
        f"No data for task '{spec.name}' under {Path(data_dir)}: looked for {' and '.join(looked)}. "
        f"This library never downloads implicitly. Prepare it with one of: " + "; ".join(how) + ".")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", re.sub(r"^/[a-z]/", "", name.lower()))


def label_permutation(task: str, names: Sequence[str] | None) -> np.ndarray | None:
    """Maps stored label ids to head indices by class name, or None if names do not match.

    Args:
      task: task name.
      names: the stored ``ClassLabel`` names (index = stored label id).

    Returns:
      ``perm`` with ``perm[stored_id] = head_index`` when ``names`` and the head's class names
      match one to one after normalisation (see the module doc); None otherwise.
    """
    head = task_prompts(get_task(task).name).classnames
    if not names or len(names) != len(head):
        return None
    index = {_norm(c): i for i, c in enumerate(head)}
    perm = [index.get(_norm(n)) for n in names]
    if len(index) != len(head) or None in perm or len(set(perm)) != len(perm):
        return None
    return np.asarray(perm, np.int64)


def load_task_split(task: str, split: str, data_dir: str | os.PathLike, *,
                    indices: Sequence[int] | np.ndarray | None = None
                    ) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Reads a task's split as ``{"image": uint8 (N, H, W, C) or list, "label": int64 (N,)}``.

    Args:
      task: task name or alias.
      split: ``"train"`` (calibration), ``"test"`` (evaluation) or ``"validation"``.
      data_dir: the tfds data directory.
      indices: positions within the split; default: all.

    Returns:
      Images as stored (uint8 HWC; a list when sizes differ); labels as indices of the task's
      head classes (re-indexed by name, or shifted by ``label_offset``: see the module doc).

    Raises:
      DatasetNotFoundError: the task's data are not prepared (fails at once).
      ValueError: unknown task or split; labels outside ``[0, num_classes)``.
    """
    spec = get_task(task)
    src = resolve_task(task, data_dir)
    if split not in src.splits:
        raise ValueError(f"Task '{spec.name}' has no split '{split}'; it has {sorted(src.splits)}.")
    raw = load_split(src.dataset, src.splits[split], data_dir, indices=indices,
                     keys=[src.image_key, src.label_key])
    names = getattr(features_of(src.dataset, data_dir)[src.label_key], "names", None)
    perm = label_permutation(spec.name, names)
    labels = np.asarray(raw[src.label_key], np.int64)
    if perm is not None:
        labels = perm[labels]
    elif src.dataset == spec.tfds_name:
        labels = labels + spec.label_offset
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"Task '{spec.name}' ({src.dataset}): labels span "
                         f"[{labels.min()}, {labels.max()}], expected [0, {spec.num_classes}).")
    return {"image": raw[src.image_key], "label": labels}


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _class_dirs(split_dir: Path) -> list[Path]:
    dirs = [p for p in split_dir.iterdir() if p.is_dir()]
    numeric = all(p.name.isdigit() for p in dirs)
    return sorted(dirs, key=lambda p: int(p.name) if numeric else p.name)


def prepare_from_image_folder(task: str, root: str | os.PathLike, data_dir: str | os.PathLike,
                              *, overwrite: bool = False) -> Path:
    """Writes a task's local dataset ``epmq_<task>`` from an image folder.

    Layout: ``root/<split>/<class>/<image>`` for splits ``train``, ``test`` (and optionally
    ``validation``). Class folders are ordered numerically when all names are integers
    (GTSRB's ``00000`` ... ``00042``), else alphabetically; that order is the stored label,
    and the folder names are stored as class names (re-indexed to the head's order on loading
    when they are the head's class names).
    Images are read with PIL and converted to RGB uint8.

    Returns:
      The written dataset directory.

    Raises:
      ValueError: a missing ``train``/``test`` folder, a class count different from the task's,
        a split with no images, or differing class folders between splits.
    """
    from PIL import Image as PILImage

    spec = get_task(task)
    root = Path(root)
    splits: dict[str, dict[str, Any]] = {}
    classes = None
    for split in ("train", "validation", "test"):
        d = root / split
        if not d.is_dir():
            if split == "validation":
                continue
            raise ValueError(f"Image folder {root} has no '{split}' directory.")
        dirs = _class_dirs(d)
        names = [p.name for p in dirs]
        if classes is None:
            classes = names
            if len(classes) != spec.num_classes:
                raise ValueError(f"{d} has {len(classes)} class folders; task '{spec.name}' has "
                                 f"{spec.num_classes} classes.")
        elif names != classes:
            raise ValueError(f"{d}: class folders differ from those of the first split.")
        images, labels = [], []
        for label, cdir in enumerate(dirs):
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() in _IMAGE_SUFFIXES:
                    with PILImage.open(f) as im:
                        images.append(np.asarray(im.convert("RGB"), np.uint8))
                    labels.append(label)
        if not images:
            raise ValueError(f"{d} holds no images ({', '.join(_IMAGE_SUFFIXES)}).")
        splits[split] = {"image": images, "label": np.asarray(labels, np.int64)}
    # Folder names are kept as class names, so labels are re-indexed to the head's order when
    # they are the head's class names (see label_permutation).
    return write_local_dataset(local_name(spec.name), data_dir, splits,
                               features={"label": tfds.features.ClassLabel(names=classes)},
                               description=f"{spec.name} from image folder {root}",
                               overwrite=overwrite)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def prepare_from_hf(task: str, data_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Downloads a task from Hugging Face datasets (online only) into ``epmq_<task>``.

    Uses ``spec.hf_dataset`` (columns ``image``/``label``, as FusionBench's copies have; for
    CIFAR: ``img``/``fine_label``) and its ``train``/``test`` (and ``validation``) splits.

    Raises:
      DatasetNotFoundError: offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set), at once.
      ImportError: the ``datasets`` package is not installed.
      ValueError: the task has no Hugging Face id.
    """
    spec = get_task(task)
    if not spec.hf_dataset:
        raise ValueError(f"Task '{spec.name}' has no Hugging Face dataset id.")
    if _offline():
        raise DatasetNotFoundError(
            f"Cannot fetch '{spec.hf_dataset}' for task '{spec.name}': Hugging Face is set "
            f"offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). Prepare the data where there is "
            f"network, or use prepare_from_image_folder.")
    try:
        import datasets as hf_datasets
    except ImportError as e:
        raise ImportError("prepare_from_hf needs the `datasets` package: pip install datasets"
                          ) from e
    ds = hf_datasets.load_dataset(spec.hf_dataset, spec.hf_config)
    splits = {}
    for split in ("train", "validation", "test"):
        if split not in ds:
            continue
        cols = ds[split].column_names
        img_key = next(k for k in ("image", "img") if k in cols)
        lab_key = next(k for k in ("label", "fine_label") if k in cols)
        images = [np.asarray(x.convert("RGB"), np.uint8) for x in ds[split][img_key]]
        splits[split] = {"image": images, "label": np.asarray(ds[split][lab_key], np.int64)}
    if "train" not in splits or "test" not in splits:
        raise ValueError(f"'{spec.hf_dataset}' lacks a train or test split: {list(ds)}.")
    return write_local_dataset(local_name(spec.name), data_dir, splits,
                               num_classes={"label": spec.num_classes},
                               description=f"{spec.name} from Hugging Face {spec.hf_dataset}",
                               overwrite=overwrite)
