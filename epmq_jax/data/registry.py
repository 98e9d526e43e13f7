"""The task registry: each CLIP image task -> the data FusionBench evaluates it on, and how to read it.

Default source: the Hugging Face dataset FusionBench loads for the task, with that dataset's own
splits (FusionBench ``config/dataset/image_classification/{train,test}/<task>.yaml``;
:data:`TASKS` lists id, config and splits per task). :func:`prepare_from_hf` streams it once into
a local array_record store ``data_dir/epmq_<task>`` (batch by batch, JPEG/PNG bytes kept as they
are), which :func:`load_task_split` and :func:`epmq_jax.data.calibration.sample_calibration` read
without network, TensorFlow or the ``datasets`` package.

Splits of the store:

- ``train``: the source's train split, whole and in order (calibration samples come from it).
- ``test``: the source's test split. Substitute: Food-101 (``ethz/food101``) has no ``test``
  split; its ``validation`` split *is* the official Food-101 test set (250 manually reviewed
  images per class), and FusionBench's test config reads it, so it is stored as ``test``.
- ``validation`` (used only to choose merge coefficients, never reported): the source's own
  validation split where it has one (Flowers102 ``validation``, PCam ``valid``, Rendered SST-2
  ``validation``); otherwise each train example joins it with probability
  :data:`VALIDATION_FRACTION` (seeded, in source order), as FusionBench's ``val`` configs draw a
  10% validation subset of train. Such a validation split is a subset of ``train``.

Nothing is ever carved from a test split.

Optional second source: tensorflow-datasets, for the tasks whose tfds builder downloads by
itself and has the same train/test structure (``TaskSpec.tfds``): build it with ``tfds build
NAME --file_format=array_record --data_dir DATA_DIR``. SUN397 and Stanford Cars (source URLs
gone), RESISC45 (manual download), EuroSAT (one split only), GTSRB, FER2013 and Rendered SST-2
(no builder) have none. A prepared ``epmq_<task>`` store is preferred over a tfds dataset.
:func:`prepare_from_image_folder` writes the store from class folders instead.

Nothing is downloaded implicitly: a task whose data are absent raises ``DatasetNotFoundError``
at once, saying what was looked for and how to prepare it.

Label orders: labels are returned as indices of the task's zero-shot head
(``epmq_jax.models.templates``: FusionBench's class names, in its order). When the stored
``ClassLabel`` names (the Hugging Face dataset's, or tfds') match the head's class names one to
one (after lower-casing, dropping SUN397's ``/a/`` prefix and all non-alphanumerics), labels are
re-indexed by name: this matters for tfds' Food-101 and SUN397, which order two classes
differently (``cheesecake``/``cheese_plate``, ``jail/indoor``/``jail_cell``). Otherwise stored
labels are used as they are (FusionBench indexes its class names with the Hugging Face labels),
plus ``label_offset`` for tfds (EMNIST letters are 1..26 there, 0..25 in the head); boolean
labels (PCam) become 0/1.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from epmq_jax.data.tfds_local import (
    DatasetNotFoundError,
    DatasetWriter,
    dataset_exists,
    features_of,
    image_feature,
    load_split,
    open_split,
    split_sizes,
    storable_image_bytes,
)
from epmq_jax.models.templates import TASKS_8, TASKS_14, TASKS_20, task_prompts

__all__ = ["TASKS", "TASKS_8", "TASKS_14", "TASKS_20", "VALIDATION_FRACTION", "VALIDATION_SEED",
           "HFSource", "TaskSource", "TaskSpec", "TfdsSource", "get_task", "label_permutation",
           "load_task_split", "local_name", "prepare_from_hf", "prepare_from_image_folder",
           "prepare_tasks", "resolve_task", "split_size"]

#: Share of a train split drawn as ``validation`` when the source has no validation split.
VALIDATION_FRACTION = 0.1
#: Seed of that draw (fixed: the validation split is a property of the prepared store).
VALIDATION_SEED = 0
#: Splits of a prepared store, in writing order.
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset, as FusionBench loads it.

    Attributes:
      repo: dataset id (``"tanganke/sun397"``).
      splits: ``{store split: source split}``, with ``train`` and ``test``; ``validation`` only
        where the source has one (otherwise it is drawn from train, see the module doc).
      config: the dataset config (``"cropped_digits"`` for SVHN), or None.
      image_key, label_key: the image and label columns.
      note: why a split is substituted, where one is.
    """

    repo: str
    splits: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"train": "train", "test": "test"})
    config: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    note: str = ""


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A tensorflow-datasets dataset whose builder downloads by itself.

    Attributes:
      name: tfds name with config (``"emnist/letters"``).
      splits: ``{split: tfds split}`` (``train``, ``test``, ``validation`` where tfds has it).
      image_key, label_key: feature names.
      label_offset: added to stored labels when they are not re-indexed by name.
    """

    name: str
    splits: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"train": "train", "test": "test"})
    image_key: str = "image"
    label_key: str = "label"
    label_offset: int = 0


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where one task's data come from.

    Attributes:
      name: the registry key (also the zero-shot head's key), e.g. ``"stanford_cars"``.
      num_classes: number of classes of the head.
      hf: the default source (FusionBench's Hugging Face dataset).
      tfds: the tfds option, or None where no tfds builder works for the task.
    """

    name: str
    num_classes: int
    hf: HFSource
    tfds: TfdsSource | None = None


_TV = {"train": "train", "validation": "validation", "test": "test"}

_TASK_LIST = [
    TaskSpec("sun397", 397, HFSource("tanganke/sun397")),
    TaskSpec("stanford_cars", 196, HFSource("tanganke/stanford_cars")),
    TaskSpec("resisc45", 45, HFSource("tanganke/resisc45")),
    TaskSpec("eurosat", 10, HFSource("tanganke/eurosat")),
    TaskSpec("svhn", 10, HFSource("ufldl-stanford/svhn", config="cropped_digits"),
             TfdsSource("svhn_cropped")),
    TaskSpec("gtsrb", 43, HFSource("tanganke/gtsrb")),
    TaskSpec("mnist", 10, HFSource("ylecun/mnist"), TfdsSource("mnist")),
    TaskSpec("dtd", 47, HFSource("tanganke/dtd"), TfdsSource("dtd", splits=_TV)),
    TaskSpec("oxford_flowers102", 102, HFSource("dpdl-benchmark/oxford_flowers102", splits=_TV),
             TfdsSource("oxford_flowers102", splits=_TV)),
    TaskSpec("pcam", 2, HFSource("1aurent/PatchCamelyon",
                                 splits={"train": "train", "validation": "valid", "test": "test"}),
             TfdsSource("patch_camelyon", splits=_TV)),
    # FusionBench: fusion_bench.dataset.fer2013.load_fer2013 (a webdataset; jpg/cls renamed).
    TaskSpec("fer2013", 7, HFSource("clip-benchmark/wds_fer2013", image_key="jpg",
                                    label_key="cls")),
    TaskSpec("oxford_iiit_pet", 37, HFSource("timm/oxford-iiit-pet"), TfdsSource("oxford_iiit_pet")),
    TaskSpec("stl10", 10, HFSource("tanganke/stl10"), TfdsSource("stl10")),
    TaskSpec("cifar100", 100, HFSource("tanganke/cifar100"), TfdsSource("cifar100")),
    TaskSpec("emnist_letters", 26, HFSource("tanganke/emnist_letters"),
             TfdsSource("emnist/letters", label_offset=-1)),
    TaskSpec("kmnist", 10, HFSource("tanganke/kmnist"), TfdsSource("kmnist")),
    TaskSpec("food101", 101, HFSource(
        "ethz/food101", splits={"train": "train", "test": "validation"},
        note="ethz/food101 has no 'test' split: its 'validation' split is the official Food-101 "
             "test set (250 reviewed images per class), which FusionBench's test config reads."),
        # tfds calls the official test split "validation" too.
        TfdsSource("food101", splits={"train": "train", "test": "validation"})),
    TaskSpec("fashion_mnist", 10, HFSource("zalando-datasets/fashion_mnist"),
             TfdsSource("fashion_mnist")),
    TaskSpec("rendered_sst2", 2, HFSource("nateraw/rendered-sst2", splits=_TV)),
    TaskSpec("cifar10", 10, HFSource("tanganke/cifar10"), TfdsSource("cifar10")),
]

#: All registered tasks by name.
TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASK_LIST}

#: Other names users type for the same tasks (FusionBench's among them).
ALIASES = {"cars": "stanford_cars", "stanford-cars": "stanford_cars",
           "flowers102": "oxford_flowers102", "pets": "oxford_iiit_pet",
           "oxford-iiit-pet": "oxford_iiit_pet", "svhn_cropped": "svhn",
           "patch_camelyon": "pcam", "emnist": "emnist_letters", "rendered-sst2": "rendered_sst2"}


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
    """Name of a task's prepared store under ``data_dir``: ``"epmq_<task>"``."""
    return f"epmq_{get_task(task).name}"


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """Where :func:`resolve_task` found a task: tfds dataset name and the split strings."""

    dataset: str
    splits: dict[str, str]
    image_key: str
    label_key: str
    label_offset: int = 0


def _how_to_prepare(spec: TaskSpec, data_dir: str | os.PathLike) -> str:
    how = [f"epmq_jax.data.registry.prepare_from_hf('{spec.name}', '{data_dir}') where there is "
           f"network (Hugging Face '{spec.hf.repo}')"]
    if spec.tfds:
        how.append(f"`tfds build {spec.tfds.name} --file_format=array_record --data_dir "
                   f"{data_dir}`")
    how.append(f"epmq_jax.data.registry.prepare_from_image_folder('{spec.name}', ROOT, "
               f"'{data_dir}')")
    return "; ".join(how)


def resolve_task(task: str, data_dir: str | os.PathLike) -> TaskSource:
    """Finds the prepared data of ``task`` under ``data_dir`` (see the module doc for the order).

    Raises:
      DatasetNotFoundError: neither the ``epmq_<task>`` store nor the tfds dataset is there.
        Checks only the file system, so it fails at once.
    """
    spec = get_task(task)
    local = local_name(spec.name)
    if dataset_exists(local, data_dir):
        return TaskSource(local, {s: s for s in split_sizes(local, data_dir)}, "image", "label")
    if spec.tfds and dataset_exists(spec.tfds.name, data_dir):
        t = spec.tfds
        return TaskSource(t.name, dict(t.splits), t.image_key, t.label_key, t.label_offset)
    looked = [local] + ([f"{spec.tfds.name} (tfds, array_record)"] if spec.tfds else [])
    raise DatasetNotFoundError(
        f"No data for task '{spec.name}' under {Path(data_dir)}: looked for {' and '.join(looked)}. "
        f"This library never downloads implicitly. Prepare it with one of: "
        f"{_how_to_prepare(spec, data_dir)}.")


def split_size(task: str, split: str, data_dir: str | os.PathLike) -> int:
    """Number of examples of a task's prepared split.

    Raises:
      DatasetNotFoundError: the task is not prepared. ValueError: no such split.
    """
    spec, src = get_task(task), resolve_task(task, data_dir)
    if split not in src.splits:
        raise ValueError(f"Task '{spec.name}' ({src.dataset}) has no split '{split}'; it has "
                         f"{sorted(src.splits)}.")
    return len(open_split(src.dataset, src.splits[split], data_dir))


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
      data_dir: the data directory holding the prepared store (or the tfds dataset).
      indices: positions within the split; default: all.

    Returns:
      Images as stored (uint8 HWC; a list when sizes differ; images prepared from Hugging Face
      are RGB, grey ones replicated); labels as indices of the task's head classes (re-indexed by
      name, or shifted by ``label_offset``: see the module doc).

    Raises:
      DatasetNotFoundError: the task's data are not prepared (fails at once).
      ValueError: unknown task or split; labels outside ``[0, num_classes)``.
    """
    spec = get_task(task)
    src = resolve_task(task, data_dir)
    if split not in src.splits:
        raise ValueError(f"Task '{spec.name}' ({src.dataset}) has no split '{split}'; it has "
                         f"{sorted(src.splits)}.")
    raw = load_split(src.dataset, src.splits[split], data_dir, indices=indices,
                     keys=[src.image_key, src.label_key])
    names = getattr(features_of(src.dataset, data_dir)[src.label_key], "names", None)
    perm = label_permutation(spec.name, names)
    labels = np.asarray(raw[src.label_key], np.int64)
    labels = perm[labels] if perm is not None else labels + src.label_offset
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"Task '{spec.name}' ({src.dataset}): labels span "
                         f"[{labels.min()}, {labels.max()}], expected [0, {spec.num_classes}).")
    return {"image": raw[src.image_key], "label": labels}


class _ValidationDraw:
    """Seeded per-example draw of a validation subset from a train split, in source order."""

    def __init__(self) -> None:
        self._rng = np.random.default_rng(VALIDATION_SEED)

    def mask(self, n: int) -> np.ndarray:
        return self._rng.random(n) < VALIDATION_FRACTION


def _progress(total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def _write_split(writer: DatasetWriter, split: str, batches: Iterable[tuple[list[bytes], list[Any]]],
                 *, num_classes: int, total: int | None, desc: str,
                 draw: _ValidationDraw | None) -> None:
    """Streams ``(encoded images, labels)`` batches into ``split`` (and drawn rows into
    ``validation`` when ``draw`` is given), with a progress bar."""
    with _progress(total, desc) as bar:
        for images, labels in batches:
            rows = []
            for img, lab in zip(images, labels, strict=True):
                lab = int(lab)  # bool labels (PCam) -> 0/1
                if not 0 <= lab < num_classes:
                    raise ValueError(f"{desc}: label {lab} at row {writer.counts[split] + len(rows)} "
                                     f"is outside [0, {num_classes}).")
                rows.append({"image": storable_image_bytes(img), "label": lab})
            writer.add(split, rows)
            drawn = [] if draw is None else [r for r, m in zip(rows, draw.mask(len(rows))) if m]
            if drawn:
                writer.add("validation", drawn)
            bar.update(len(rows))


def _label_feature(names: Sequence[str] | None, spec: TaskSpec, source: str) -> Any:
    if names is None:
        return tfds.features.ClassLabel(num_classes=spec.num_classes)
    if len(names) != spec.num_classes:
        raise ValueError(f"'{source}' labels {len(names)} classes; task '{spec.name}' has "
                         f"{spec.num_classes}.")
    return tfds.features.ClassLabel(names=list(names))


def _check_validation(writer: DatasetWriter, spec: TaskSpec) -> None:
    if writer.counts["validation"] == 0:
        raise ValueError(f"Task '{spec.name}': the {VALIDATION_FRACTION:.0%} validation draw from "
                         f"{writer.counts['train']} train examples came out empty; give the source "
                         f"a validation split.")


def prepare_from_hf(task: str, data_dir: str | os.PathLike, *,
                    source: str | os.PathLike | None = None, revision: str | None = None,
                    streaming: bool = True, batch_size: int = 256,
                    overwrite: bool = False) -> Path:
    """Streams a task's Hugging Face dataset (FusionBench's, by default) into ``epmq_<task>``.

    Reads each split in batches of ``batch_size`` rows (never a whole split), with a progress
    bar, and writes the store batch by batch: JPEG/PNG bytes are stored as they are, only odd
    images (palette, RGBA, CMYK, ...) are converted (see
    :func:`epmq_jax.data.tfds_local.storable_image_bytes`). Splits are those of
    ``spec.hf.splits`` (see the module doc for ``validation``). Labels are stored as the source
    has them, with its ``ClassLabel`` names, so :func:`load_task_split` re-indexes them by name.

    Args:
      task: task name or alias.
      data_dir: where the store goes (``data_dir/epmq_<task>/1.0.0``).
      source: another hub id, a local folder in the hub's layout, or a ``save_to_disk`` folder
        holding the same splits; default: ``spec.hf.repo``.
      revision: hub revision to pin (hub ids only).
      streaming: stream from the hub (default; nothing is cached) instead of downloading each
        split into the Hugging Face cache and reading it memory-mapped.
      batch_size: rows read and written at once.
      overwrite: replace an existing store (only once the new one is complete).

    Returns:
      The store's directory.

    Raises:
      DatasetNotFoundError: Hugging Face is set offline and ``source`` is a hub id (at once).
      FileExistsError: the store exists and ``overwrite`` is False (before anything is read).
      ValueError: unknown task; a split, image or label column missing in the source; class
        count or labels that do not fit the task.
      ImportError: the ``datasets`` package is not installed.
    """
    from epmq_jax.data import hf_stream

    spec = get_task(task)
    hf = spec.hf
    src = os.fspath(source) if source is not None else hf.repo
    hf_stream.check_reachable(src, f"task '{spec.name}'")
    if dataset_exists(local_name(spec.name), data_dir) and not overwrite:
        raise FileExistsError(f"Task '{spec.name}' is already prepared under {Path(data_dir)} "
                              f"({local_name(spec.name)}); pass overwrite=True to replace it.")
    opened = {split: hf_stream.open_split(src, name, config=hf.config, streaming=streaming,
                                          revision=revision)
              for split, name in hf.splits.items()}  # every split exists, before any writing
    first = opened["train"][0]
    img_key = hf_stream.pick_column(first, (hf.image_key, "image", "img"), "image", src)
    lab_key = hf_stream.pick_column(first, (hf.label_key, "label"), "label", src)
    features = {"image": image_feature(3),
                "label": _label_feature(hf_stream.class_names(first, lab_key), spec, src)}
    description = (f"{spec.name} from Hugging Face '{src}'"
                   f"{f' ({hf.config})' if hf.config else ''}, splits "
                   f"{dict(hf.splits)}"
                   f"{'' if 'validation' in hf.splits else '; validation: a seeded draw of train'}"
                   f". {hf.note}".strip())
    with DatasetWriter(local_name(spec.name), data_dir, features, SPLITS,
                       description=description, overwrite=overwrite) as writer:
        for split in ("train", "validation", "test"):
            if split not in opened:
                continue
            ds, total = opened[split]
            batches = ((b[img_key], b[lab_key]) for b in
                       hf_stream.iter_batches(ds, [img_key, lab_key], batch_size,
                                              image_columns=[img_key]))
            draw = _ValidationDraw() if split == "train" and "validation" not in opened else None
            _write_split(writer, split, batches, num_classes=spec.num_classes, total=total,
                         desc=f"{spec.name} {hf.splits[split]}->{split}", draw=draw)
        _check_validation(writer, spec)
    return writer.out


def prepare_tasks(tasks: Sequence[str], data_dir: str | os.PathLike, **kwargs: Any) -> list[str]:
    """:func:`prepare_from_hf` for each task that :func:`resolve_task` does not find yet.

    Args:
      tasks: task names (e.g. ``TASKS_8``).
      data_dir: the data directory.
      **kwargs: passed to :func:`prepare_from_hf` (``source`` excepted: one per task).

    Returns:
      The tasks that were prepared now.
    """
    if "source" in kwargs:
        raise ValueError("prepare_tasks: `source` names one dataset; call prepare_from_hf per task.")
    done = []
    for task in tasks:
        try:
            resolve_task(task, data_dir)
        except DatasetNotFoundError:
            prepare_from_hf(task, data_dir, **kwargs)
            done.append(get_task(task).name)
    return done


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _class_dirs(split_dir: Path) -> list[Path]:
    dirs = [p for p in split_dir.iterdir() if p.is_dir()]
    numeric = all(p.name.isdigit() for p in dirs)
    return sorted(dirs, key=lambda p: int(p.name) if numeric else p.name)


def _folder_batches(dirs: Sequence[Path], batch_size: int
                    ) -> Iterator[tuple[list[bytes], list[int]]]:
    images, labels = [], []
    for label, cdir in enumerate(dirs):
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                images.append(f.read_bytes())
                labels.append(label)
                if len(images) == batch_size:
                    yield images, labels
                    images, labels = [], []
    if images:
        yield images, labels


def prepare_from_image_folder(task: str, root: str | os.PathLike, data_dir: str | os.PathLike,
                              *, batch_size: int = 256, overwrite: bool = False) -> Path:
    """Writes a task's store ``epmq_<task>`` from an image folder, streaming like
    :func:`prepare_from_hf`.

    Layout: ``root/<split>/<class>/<image>`` for splits ``train``, ``test`` and optionally
    ``validation`` (else drawn from train as for Hugging Face sources). Class folders are
    ordered numerically when all names are integers (GTSRB's ``00000`` ... ``00042``), else
    alphabetically; that order is the stored label, and the folder names are stored as class
    names (re-indexed to the head's order on loading when they are the head's class names).
    JPEG/PNG files are stored as they are; other formats (PPM, ...) are converted to RGB PNG.

    Returns:
      The written dataset directory.

    Raises:
      ValueError: a missing ``train``/``test`` folder, a class count different from the task's,
        a split with no images, or differing class folders between splits.
    """
    spec = get_task(task)
    root = Path(root)
    splits = {}
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            if split == "validation":
                continue
            raise ValueError(f"Image folder {root} has no '{split}' directory.")
        splits[split] = _class_dirs(d)
        names = [p.name for p in splits[split]]
        if len(names) != spec.num_classes:
            raise ValueError(f"{d} has {len(names)} class folders; task '{spec.name}' has "
                             f"{spec.num_classes} classes.")
        if names != [p.name for p in splits["train"]]:
            raise ValueError(f"{d}: class folders differ from those of {root / 'train'}.")
    features = {"image": image_feature(3),
                "label": tfds.features.ClassLabel(names=[p.name for p in splits["train"]])}
    with DatasetWriter(local_name(spec.name), data_dir, features, SPLITS,
                       description=f"{spec.name} from image folder {root}",
                       overwrite=overwrite) as writer:
        for split, dirs in splits.items():
            draw = _ValidationDraw() if split == "train" and "validation" not in splits else None
            _write_split(writer, split, _folder_batches(dirs, batch_size),
                         num_classes=spec.num_classes, total=None, desc=f"{spec.name} {split}",
                         draw=draw)
            if writer.counts[split] == 0:
                raise ValueError(f"{root / split} holds no images ({', '.join(_IMAGE_SUFFIXES)}).")
        _check_validation(writer, spec)
    return writer.out
