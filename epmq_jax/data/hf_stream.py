"""Reading a Hugging Face dataset split in batches, for preparation into the local store.

Shared by :func:`epmq_jax.data.registry.prepare_from_hf` (image tasks) and
:func:`epmq_jax.data.glue.prepare_from_hf` (GLUE). A split is opened with ``datasets``' streaming
(default: nothing but the current batch is held, nothing is cached on disk) or as an
Arrow-backed dataset (downloaded to the Hugging Face cache, memory-mapped), and read with
``.iter(batch_size=...)``, image columns undecoded (``Image(decode=False)``: the stored bytes).

A source is a hub id (``"tanganke/sun397"``), a local directory in the hub's layout (parquet or
image files, with or without a README's ``configs``), or a directory written by
``DatasetDict.save_to_disk``. Hub ids are refused at once when Hugging Face is set offline
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``), so tests and air-gapped machines fail fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("Preparing data from Hugging Face needs the `datasets` package: "
                          "pip install 'epmq-jax[paper]' (or pip install datasets).") from e
    return datasets


def check_reachable(source: str | os.PathLike, what: str) -> None:
    """Raises at once when ``source`` is a hub id and Hugging Face is set offline.

    Raises:
      epmq_jax.data.tfds_local.DatasetNotFoundError: offline and ``source`` is no local folder.
    """
    from epmq_jax.data.tfds_local import DatasetNotFoundError

    if is_offline() and not Path(source).is_dir():
        raise DatasetNotFoundError(
            f"Cannot fetch '{source}' for {what}: Hugging Face is set offline (HF_HUB_OFFLINE / "
            f"HF_DATASETS_OFFLINE) and no local folder of that name exists. Prepare the data "
            f"where there is network, or pass source=<a local copy in the hub's layout>.")


def open_split(source: str | os.PathLike, split: str, *, config: str | None = None,
               streaming: bool = True, revision: str | None = None) -> tuple[Any, int | None]:
    """Opens one split of a Hugging Face dataset without reading its rows.

    Args:
      source: hub id, local hub-layout folder, or ``save_to_disk`` folder (see the module doc).
      split: the source's split name.
      config: the dataset config, or None.
      streaming: stream rows (``IterableDataset``) instead of downloading the split into the
        Hugging Face cache first; ignored for ``save_to_disk`` folders (memory-mapped already).
      revision: a hub revision (branch, tag or commit) to pin.

    Returns:
      ``(dataset, number of rows or None when the source does not say)``.

    Raises:
      ValueError: the source has no such split (the message lists the ones it has).
      ImportError: ``datasets`` is missing.
    """
    datasets = _datasets()
    path = Path(source)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(os.fspath(path))
        if split not in dd:
            raise ValueError(f"'{source}' has no split '{split}'; it has {sorted(dd)}.")
        return dd[split], len(dd[split])
    try:
        ds = datasets.load_dataset(os.fspath(source), config, split=split, streaming=streaming,
                                   revision=revision)
    except ValueError as e:  # datasets: 'Unknown split "x". Should be one of [...]'
        if "split" in str(e).lower():
            raise ValueError(f"'{source}'{f' ({config})' if config else ''} has no split "
                             f"'{split}': {e}") from e
        raise
    if isinstance(ds, datasets.Dataset):
        return ds, len(ds)
    info = ds.info.splits.get(split) if ds.info.splits else None
    return ds, (int(info.num_examples) if info and info.num_examples else None)


def class_names(ds: Any, column: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``column``, or None when it is no ``ClassLabel`` (ints, bools)."""
    feature = (ds.features or {}).get(column)
    return list(feature.names) if hasattr(feature, "names") else None


def pick_column(ds: Any, candidates: Sequence[str], what: str, source: str) -> str:
    """The first of ``candidates`` that ``ds`` has, else a ValueError listing its columns."""
    columns = list(ds.column_names or (ds.features or {}))
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(f"'{source}' has no {what} column (looked for {list(candidates)}); its "
                     f"columns are {columns}.")


def iter_batches(ds: Any, columns: Sequence[str], batch_size: int, *,
                 image_columns: Sequence[str] = ()) -> Iterator[dict[str, list[Any]]]:
    """Yields ``{column: list of at most batch_size values}``, in the source's row order.

    Image columns come as the stored file bytes (never decoded).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}, expected >= 1.")
    datasets = _datasets()
    ds = ds.select_columns(list(columns))
    for c in image_columns:
        ds = ds.cast_column(c, datasets.Image(decode=False))
    for batch in ds.iter(batch_size=batch_size):
        for c in image_columns:
            batch[c] = [_image_bytes(x) for x in batch[c]]
        yield batch


def _image_bytes(value: Any) -> bytes:
    """The encoded bytes of an undecoded ``Image`` value ``{"bytes": ..., "path": ...}``."""
    if value.get("bytes") is not None:
        return value["bytes"]
    if value.get("path"):
        return Path(value["path"]).read_bytes()
    raise ValueError(f"An image value holds neither bytes nor a path: {value!r}.")
