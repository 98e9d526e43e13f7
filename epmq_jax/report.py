"""Result rows of a benchmark run, and their outputs: results.json / .md / .csv and the terminal table.

A run produces a list of **rows**, one per table row (a model variant scored on every task).
A row is a plain dict (JSON-ready) with these keys (:data:`ROW_KEYS`):

- ``merge``: ``"expert"`` (the FP experts, each task scored by its own expert),
  ``"multitask"`` (one model fine-tuned on all tasks), or a merge method: ``"ta"``, ``"ties"``,
  ``"regmean"``, ... The first two (:data:`SHARED_MERGES`) are float reference rows that belong
  to no merge method.
- ``method``: ``"fp"`` (the float model), ``"epmq_unrounded"`` (E-PMQ's relaxation W* kept in
  float), ``"epmq_full_unrounded"`` (E-PMQ-full's, this project's extension), or a quantizer:
  ``"rtn"``, ``"gptq"``, ``"awq"``, ``"epmq"``, ``"epmq_full"`` (see :data:`METHODS`).
- ``bits``: int, or None for float rows.
- ``avg``: mean of ``per_task`` (percent); ``per_task``: task name -> test score (percent): an
  accuracy in [0, 100], or a correlation in [-100, 100] (GLUE's STS-B Spearman, CoLA's MCC).
- the E-PMQ switches ``lam``, ``anchor``, ``target``, ``alpha`` (the ``mix`` weight),
  ``task_weights``, ``rounding`` (None on rows that are not E-PMQ);
- ``default``: True on the row that stands as *the* result of its method at its (merge, bits):
  per method, so the paper's E-PMQ (``epmq``) and E-PMQ-full (``epmq_full``, its
  validation-chosen settings) each have one (:func:`default_row`);
- ``block``: ``"main"`` (the headline table), ``"sweep"`` (anchor strength λ sweep),
  ``"ablation"`` (target-input / anchor-form switches) or ``"full"`` (E-PMQ-full's pieces, each
  alone; ``settings["full_piece"]`` names it). The default rows live in ``"main"``; the other
  blocks show their method's default beside their own rows;
- ``merge_scaling``: the merge coefficient used (chosen on validation), None where not applicable.
- ``settings``: a JSON object of everything else that defines the row (RegMean's Gram source and
  α, the damping's size and centre, ...); ``{}`` when there is nothing to add.

:func:`make_row` builds a row and checks it. Writers: :func:`write_json` (:func:`write_doc`),
:func:`write_csv`, :func:`write_markdown`; readers :func:`read_json`, :func:`read_csv`; :func:`format_table` renders
the same blocks for the terminal.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SWITCH_KEYS = ("lam", "anchor", "target", "alpha", "task_weights", "rounding")
ROW_KEYS = ("merge", "method", "bits", "block", "default", "merge_scaling", *SWITCH_KEYS,
            "settings", "avg", "per_task")
#: Row methods in display order; :data:`FLOAT_METHODS` have ``bits=None``.
METHODS = ("fp", "epmq_unrounded", "epmq_full_unrounded", "rtn", "gptq", "awq", "epmq", "epmq_full")
FLOAT_METHODS = ("fp", "epmq_unrounded", "epmq_full_unrounded")
BLOCKS = ("main", "sweep", "ablation", "full")
#: Float reference rows that belong to no merge method.
SHARED_MERGES = ("expert", "multitask")
MERGE_NAMES = {"expert": "FP experts", "multitask": "FP multi-task model", "ta": "Task Arithmetic",
               "ties": "TIES-Merging", "regmean": "RegMean", "average": "Averaging"}
METHOD_NAMES = {"fp": "FP merge", "rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "epmq": "E-PMQ",
                "epmq_unrounded": "E-PMQ unrounded (FP)", "epmq_full": "E-PMQ-full",
                "epmq_full_unrounded": "E-PMQ-full unrounded (FP)"}


def make_row(merge: str, method: str, per_task: Mapping[str, float], *, bits: int | None = None,
             block: str = "main", default: bool = False, merge_scaling: float | None = None,
             settings: Mapping[str, Any] | None = None, **switches: Any) -> dict[str, Any]:
    """Builds one result row (see the module docstring) and checks it.

    Args:
      merge, method, bits, block, default, merge_scaling: as in the row schema.
      per_task: task name -> score in percent: an accuracy (0..100) or a correlation, which
        may be negative (-100..100).
      settings: the row's other settings (JSON-able), default ``{}``.
      **switches: E-PMQ switches (``lam``, ``anchor``, ``target``, ``alpha``, ``task_weights``,
        ``rounding``); missing ones are None.

    Raises:
      ValueError: unknown method/block/switch, bits given for a float method (or missing for
        a quantized one), or a score that is not finite or outside [-100, 100].
    """
    if method not in METHODS:
        raise ValueError(f"row method {method!r}: expected one of {METHODS}")
    if block not in BLOCKS:
        raise ValueError(f"row block {block!r}: expected one of {BLOCKS}")
    unknown = set(switches) - set(SWITCH_KEYS)
    if unknown:
        raise ValueError(f"row switches {sorted(unknown)}: expected only {SWITCH_KEYS}")
    float_method = method in FLOAT_METHODS
    if float_method != (bits is None):
        raise ValueError(f"row ({merge}, {method}): bits={bits!r}, expected "
                         + ("None for a float method" if float_method else "an int for a quantized method"))
    if not per_task:
        raise ValueError(f"row ({merge}, {method}, {bits}): per_task is empty")
    for task, acc in per_task.items():
        if not (isinstance(acc, int | float) and math.isfinite(acc) and -100.0 <= acc <= 100.0):
            raise ValueError(f"row ({merge}, {method}, {bits}): per_task[{task!r}]={acc!r}, "
                             "expected a finite percentage in [-100, 100] (accuracy or correlation)")
    per = {str(k): float(v) for k, v in per_task.items()}
    row = {"merge": merge, "method": method, "bits": None if bits is None else int(bits),
           "block": block, "default": bool(default),
           "merge_scaling": None if merge_scaling is None else float(merge_scaling)}
    row.update({k: switches.get(k) for k in SWITCH_KEYS})
    row["settings"] = _jsonable(dict(settings or {}))
    row["avg"] = sum(per.values()) / len(per)
    row["per_task"] = per
    return row


def row_label(row: Mapping[str, Any], *, with_merge: bool = False) -> str:
    """A short human label: ``"GPTQ w4"``, ``"E-PMQ w4 λ=0.1"``, ``"FP experts"``, ``"FP merge"``."""
    merge, method, bits = row["merge"], row["method"], row["bits"]
    if merge in SHARED_MERGES:
        return MERGE_NAMES[merge]
    label = METHOD_NAMES.get(method, method)
    if bits is not None:
        label += f" w{bits}"
    if row.get("block", "main") == "full":
        label += " " + piece_label(row)
    elif row.get("block", "main") != "main":
        label += " " + switch_label(row)
    if with_merge:
        label = f"{MERGE_NAMES.get(merge, merge)}: {label}"
    return label


def switch_label(row: Mapping[str, Any], keys: Sequence[str] = ("lam", "target", "anchor", "rounding")) -> str:
    """The E-PMQ switches of a row, e.g. ``"λ=0.1 target=expert anchor=output rounding=gptq"``."""
    parts = []
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if key == "lam":
            parts.append(f"λ={value:g}")
        elif key == "target" and value == "mix" and row.get("alpha") is not None:
            parts.append(f"target=mix({row['alpha']:g})")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def piece_label(row: Mapping[str, Any]) -> str:
    """The E-PMQ-full piece of a row: ``"bias only"``, ``"every piece off"``, ``"all pieces"``."""
    piece = (row.get("settings") or {}).get("full_piece", "all")
    return {"all": "all pieces", "none": "every piece off"}.get(piece, f"{piece} only")


def tasks_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Task names in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for t in r["per_task"]:
            seen.setdefault(t, None)
    return list(seen)


def default_row(rows: Sequence[Mapping[str, Any]], merge: str, bits: int | None,
                method: str = "epmq") -> Mapping[str, Any] | None:
    """The default row of ``method`` (E-PMQ unless given) at (merge, bits), or None."""
    for r in rows:
        if r["merge"] == merge and r["bits"] == bits and r["method"] == method and r["default"]:
            return r
    return None


def table_blocks(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[Mapping[str, Any]]]]:
    """Groups rows into the table's blocks, in display order.

    Returns:
      ``[(kind, title, rows), ...]`` with kind ``"main"``, ``"sweep"`` or ``"ablation"``: the
      shared float rows (:data:`SHARED_MERGES`: experts, multi-task model); one block per merge
      method (FP merge, E-PMQ unrounded, then RTN/GPTQ/AWQ/E-PMQ at each bit width, widest
      first); then per (merge, bits) the λ sweep (with the default row, by λ) and the switch
      ablations (default row first); then per (merge, bits or FP) E-PMQ-full's pieces (its
      default row, every piece, last).
    """
    main = [r for r in rows if r["block"] == "main"]
    shared = [r for r in main if r["merge"] in SHARED_MERGES]
    out: list[tuple[str, str, list[Mapping[str, Any]]]] = []
    if shared:
        out.append(("main", "Full precision, no merge method", shared))
    merges = list(dict.fromkeys(r["merge"] for r in rows if r["merge"] not in SHARED_MERGES))
    order = {m: i for i, m in enumerate(METHODS)}
    for merge in merges:
        mrows = [r for r in main if r["merge"] == merge]
        floats = sorted((r for r in mrows if r["bits"] is None), key=lambda r: order.get(r["method"], 99))
        quant = sorted((r for r in mrows if r["bits"] is not None),
                       key=lambda r: (-r["bits"], order.get(r["method"], 99)))
        scaling = next((r["merge_scaling"] for r in mrows if r["merge_scaling"] is not None), None)
        title = MERGE_NAMES.get(merge, merge) + (f" (merge coefficient {scaling:g})" if scaling is not None else "")
        if floats or quant:
            out.append(("main", title, floats + quant))
    for block, what in (("sweep", "anchor strength λ"), ("ablation", "switches")):
        keys = list(dict.fromkeys((r["merge"], r["bits"]) for r in rows if r["block"] == block))
        for merge, bits in keys:
            brows = [r for r in rows if r["block"] == block and r["merge"] == merge and r["bits"] == bits]
            d = default_row(rows, merge, bits)
            if d is not None:
                brows = [d, *brows]
            if block == "sweep":
                brows = sorted(brows, key=lambda r: r["lam"] if r["lam"] is not None else -1.0)
            bits_s = "FP" if bits is None else f"{bits} bits"
            out.append((block, f"E-PMQ {what}, {MERGE_NAMES.get(merge, merge)}, {bits_s}", brows))
    keys = list(dict.fromkeys((r["merge"], r["bits"], r["method"]) for r in rows if r["block"] == "full"))
    for merge, bits, method in keys:
        brows = [r for r in rows if r["block"] == "full" and (r["merge"], r["bits"], r["method"]) == (merge, bits, method)]
        d = default_row(rows, merge, bits, method)
        bits_s = "unrounded (FP)" if bits is None else f"{bits} bits"
        out.append(("full", f"E-PMQ-full pieces, {MERGE_NAMES.get(merge, merge)}, {bits_s}",
                    [*brows, *([d] if d is not None else [])]))
    return out


def _block_label(row: Mapping[str, Any], block: str) -> str:
    """Inside a sweep/ablation block the title names merge and bits: the label is the switches."""
    if block == "main":
        return row_label(row)
    if block == "full":
        return piece_label(row) + (" (default)" if row["default"] else "")
    keys = ("lam",) if block == "sweep" else ("target", "anchor", "rounding", "lam")
    return switch_label(row, keys) + (" (default)" if row["default"] else "")


def short_task_names(tasks: Sequence[str], width: int = 8) -> list[str]:
    """Column labels of at most ``width`` characters, unique, for the terminal table.

    A name that is too long loses the first ``_``-token most tasks share (``mnist_rot90`` ->
    ``rot90``); if still too long, it becomes its longest token (``flip_parity`` -> ``parity``);
    then it is truncated. Duplicates fall back to the truncated full name plus its column index.
    """
    heads = [t.split("_", 1)[0] for t in tasks if "_" in t]
    common = max(set(heads), key=heads.count) if heads else None
    out = []
    for t in tasks:
        s = t
        if len(s) > width and common and s.startswith(common + "_"):
            s = s[len(common) + 1:]
        if len(s) > width:
            s = max(s.split("_"), key=len)
        out.append(s[:width])
    if len(set(out)) < len(out):
        out = [f"{t[: width - 2]}{i}" for i, t in enumerate(tasks)]
    return out


def format_table(rows: Sequence[Mapping[str, Any]], *, title: str | None = None, col_width: int = 8) -> str:
    """Renders the rows as a fixed-width text table: per-task accuracies and their average, by block.

    Task columns carry :func:`short_task_names` labels (results.md and .csv keep the full names).
    """
    tasks = tasks_of(rows)
    blocks = table_blocks(rows)
    label_w = max([len(_block_label(r, k)) for k, _, b in blocks for r in b] + [24]) + 2
    header = " " * label_w + "".join(f"{t:>{col_width + 1}}" for t in short_task_names(tasks, col_width)) \
        + f"{'avg':>{col_width + 1}}"
    lines = [title] if title else []
    lines.append(header)
    for kind, btitle, brows in blocks:
        lines.append(f"-- {btitle} " + "-" * max(0, len(header) - len(btitle) - 4))
        for r in brows:
            cells = "".join(f"{r['per_task'].get(t, float('nan')):>{col_width + 1}.1f}" for t in tasks)
            lines.append(f"{_block_label(r, kind):<{label_w}}{cells}{r['avg']:>{col_width + 1}.1f}")
    return "\n".join(lines)


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The same blocks as :func:`format_table`, as GitHub markdown tables (one per block)."""
    tasks = tasks_of(rows)
    out = []
    for kind, btitle, brows in table_blocks(rows):
        out.append(f"### {btitle}\n")
        out.append("| variant | " + " | ".join(tasks) + " | avg |")
        out.append("|---|" + "---:|" * (len(tasks) + 1))
        for r in brows:
            cells = " | ".join(f"{r['per_task'].get(t, float('nan')):.1f}" for t in tasks)
            out.append(f"| {_block_label(r, kind)} | {cells} | **{r['avg']:.1f}** |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- environment


def environment_info() -> dict[str, Any]:
    """Versions (python, jax, jaxlib, flax, numpy, optax, orbax) and the machine (platform, CPUs, devices)."""
    import importlib.metadata as md

    import jax

    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "optax", "orbax-checkpoint", "epmq-jax"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    devices = jax.devices()
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind if devices else None,
        "device_count": len(devices),
    }
    return {"versions": versions, "machine": machine}


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


# ----------------------------------------------------------------------------- writers / readers


def write_json(path: str | Path, rows: Sequence[Mapping[str, Any]], *, config: Mapping[str, Any] | None = None,
               timings: Mapping[str, float] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Writes results.json: ``rows``, ``tasks``, ``config``, ``versions``, ``machine``, ``timings``, ``created``.

    The file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    env = environment_info()
    doc = {
        "rows": [dict(r) for r in rows],
        "tasks": tasks_of(rows),
        "config": dict(config or {}),
        "versions": env["versions"],
        "machine": env["machine"],
        "timings": dict(timings or {}),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    doc.update(extra or {})
    return write_doc(path, doc)


def write_doc(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Writes a results document as it is (e.g. one :func:`read_json` read and a caller extended)
    to a temporary name and renames it, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
    tmp.replace(path)
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    """Reads results.json (see :func:`write_json`); raises ValueError if it has no ``rows``."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path}: not a results.json (expected an object with a 'rows' list)")
    return doc


_CSV_FIXED = ("merge", "method", "bits", "block", "default", "merge_scaling", *SWITCH_KEYS, "settings",
              "avg")
_CSV_TYPES = {"bits": int, "merge_scaling": float, "lam": float, "alpha": float, "avg": float}


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Writes results.csv: the fixed row columns, then one column per task (score, percent).

    Empty cells stand for None; ``settings`` is a JSON object; :func:`read_csv` reads the rows back.
    """
    tasks = tasks_of(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*_CSV_FIXED, *tasks])
        for r in rows:
            fixed = ["" if r.get(k) is None else repr(r[k]) if isinstance(r[k], float)
                     else json.dumps(r[k], sort_keys=True) if k == "settings" else r[k]
                     for k in _CSV_FIXED]
            w.writerow([*fixed, *(repr(r["per_task"][t]) if t in r["per_task"] else "" for t in tasks)])
    return Path(path)


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Reads results.csv back into rows (same keys and types as written)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        tasks = header[len(_CSV_FIXED):]
        rows = []
        for cells in reader:
            row: dict[str, Any] = {}
            for k, v in zip(_CSV_FIXED, cells):
                if v == "":
                    row[k] = None
                elif k == "default":
                    row[k] = v == "True"
                elif k == "settings":
                    row[k] = json.loads(v)
                else:
                    row[k] = _CSV_TYPES.get(k, str)(v)
            row["per_task"] = {t: float(v) for t, v in zip(tasks, cells[len(_CSV_FIXED):]) if v != ""}
            row["settings"] = row.get("settings") or {}
            rows.append({k: row[k] for k in ROW_KEYS})
    return rows


def _markdown_section(rows: Sequence[Mapping[str, Any]], notes: Iterable[str],
                      timings: Mapping[str, float] | None) -> list[str]:
    parts = [f"{n}\n" for n in notes]
    parts.append(format_markdown(rows))
    if timings:
        parts.append("### Timings (s)\n")
        parts.append("| step | seconds |\n|---|---:|")
        parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        parts.append("")
    return parts


def write_markdown(path: str | Path, rows: Sequence[Mapping[str, Any]], *, title: str = "Results",
                   notes: Iterable[str] = (), timings: Mapping[str, float] | None = None,
                   heading: str | None = None, companions: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Writes results.md: a title, notes (e.g. the split used), the table blocks, and the timings.

    Args:
      companions: the companion configs run with this one (``run.companions``), each a mapping
        with ``heading``, ``rows`` and optionally ``notes`` and ``timings``: each gets a section
        ``## <heading>`` after this run's, which is then headed ``## <heading>`` too (``heading``,
        default ``title``).
    """
    env = environment_info()
    parts = [f"# {title}\n"]
    if companions:
        parts.append(f"## {heading or title}\n")
    parts += _markdown_section(rows, notes, timings)
    for c in companions:
        parts.append(f"## {c['heading']}\n")
        parts += _markdown_section(c["rows"], c.get("notes", ()), c.get("timings"))
    m = env["machine"]
    parts.append(f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m['backend']} ({m['device_kind']}).  ")
    parts.append("Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + "\n")
    Path(path).write_text("\n".join(parts))
    return Path(path)
