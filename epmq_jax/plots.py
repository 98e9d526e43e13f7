"""Plots of a run's result rows (see :mod:`epmq_jax.report`), written as PNG with matplotlib's Agg backend.

- :func:`plot_lambda_sweep`: average accuracy against the E-PMQ anchor strength λ, one panel per
  (merge, bits) sweep, with the GPTQ row of the same (merge, bits), the FP merge and the FP
  experts as horizontal reference lines.
- :func:`plot_per_task`: per-task accuracy bars for each method, one panel per merge method at
  one bit width.
- :func:`plot_bits`: average accuracy against bit width for RTN, GPTQ, AWQ and E-PMQ, one panel
  per merge method, with the float rows as horizontal lines.

:func:`plot_all` writes all three into a directory and returns the paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from epmq_jax.report import (  # noqa: E402
    MERGE_NAMES,
    METHOD_NAMES,
    SHARED_MERGES,
    default_row,
    tasks_of,
)

Row = Mapping[str, Any]
_QUANT_METHODS = ("rtn", "gptq", "awq", "epmq", "epmq_full")
_DEFAULTED = ("epmq", "epmq_full", "epmq_full_unrounded")   # methods with several rows: the default one is drawn
_COLORS = {"rtn": "tab:gray", "gptq": "tab:blue", "awq": "tab:orange", "epmq": "tab:red", "epmq_full": "tab:brown",
           "fp": "black", "epmq_unrounded": "tab:purple", "epmq_full_unrounded": "tab:pink",
           "expert": "tab:green", "multitask": "tab:olive"}


def _find(rows: Sequence[Row], **match: Any) -> Row | None:
    for r in rows:
        if r["block"] == "main" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _merges(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r["merge"] for r in rows if r["merge"] not in SHARED_MERGES))


def _panels(n: int, width: float = 5.5, height: float = 4.0, *, vertical: bool = False
            ) -> tuple[plt.Figure, np.ndarray]:
    n = max(n, 1)
    shape, size = ((n, 1), (width, height * n)) if vertical else ((1, n), (width * n, height))
    fig, axes = plt.subplots(*shape, figsize=size, squeeze=False, layout="constrained")
    return fig, axes.ravel()


def _legend_below(ax: plt.Axes, ncol: int = 3) -> None:
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _hline(ax: plt.Axes, row: Row | None, label: str, color: str, style: str = "--") -> None:
    if row is not None:
        ax.axhline(row["avg"], color=color, linestyle=style, linewidth=1.2, label=f"{label} ({row['avg']:.1f})")


def plot_lambda_sweep(rows: Sequence[Row], path: str | Path) -> Path | None:
    """Average accuracy vs anchor strength λ (symlog x axis, so λ = 0 is shown); None if no sweep rows."""
    keys = list(dict.fromkeys((r["merge"], r["bits"]) for r in rows if r["block"] == "sweep"))
    if not keys:
        return None
    fig, axes = _panels(len(keys))
    for ax, (merge, bits) in zip(axes, keys):
        pts = [r for r in rows if r["block"] == "sweep" and r["merge"] == merge and r["bits"] == bits]
        d = default_row(rows, merge, bits)
        pts = sorted([*pts, *([d] if d is not None else [])], key=lambda r: r["lam"])
        lams = [r["lam"] for r in pts]
        ax.plot(lams, [r["avg"] for r in pts], "o-", color=_COLORS["epmq"], label=f"E-PMQ w{bits}")
        if d is not None:
            ax.plot([d["lam"]], [d["avg"]], "*", color=_COLORS["epmq"], markersize=14, label=f"default λ={d['lam']:g}")
        _hline(ax, _find(rows, merge=merge, method="gptq", bits=bits), f"GPTQ w{bits}", _COLORS["gptq"])
        _hline(ax, _find(rows, merge=merge, method="fp"), "FP merge", _COLORS["fp"])
        _hline(ax, _find(rows, merge="expert"), "FP experts", _COLORS["expert"], ":")
        positive = [x for x in lams if x > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
        ax.set_xlim(left=0.0, right=2.0 * max(lams) if positive else 1.0)
        ax.set_xlabel("anchor strength λ")
        ax.set_ylabel("average test accuracy (%)")
        ax.set_title(f"{MERGE_NAMES.get(merge, merge)}, {bits} bits")
        ax.grid(alpha=0.3)
        _legend_below(ax, ncol=2)
    return _save(fig, path)


def plot_per_task(rows: Sequence[Row], path: str | Path, *, bits: int | None = None) -> Path | None:
    """Grouped bars of per-task accuracy: FP experts, multi-task model, FP merge, E-PMQ unrounded, and each
    quantizer at ``bits`` (default: the widest bit width in the rows), one panel per merge method."""
    tasks = tasks_of(rows)
    all_bits = sorted({r["bits"] for r in rows if r["bits"] is not None}, reverse=True)
    bits = bits if bits is not None else (all_bits[0] if all_bits else None)
    merges = _merges(rows)
    if not merges:
        return None
    fig, axes = _panels(len(merges), width=max(7.0, 1.1 * len(tasks) + 2), height=3.6, vertical=True)
    for ax, merge in zip(axes, merges):
        series: list[tuple[str, Row, str]] = []
        for label, r, c in (("FP experts", _find(rows, merge="expert"), _COLORS["expert"]),
                            (MERGE_NAMES["multitask"], _find(rows, merge="multitask"), _COLORS["multitask"]),
                            ("FP merge", _find(rows, merge=merge, method="fp"), _COLORS["fp"]),
                            (METHOD_NAMES["epmq_unrounded"], _find(rows, merge=merge, method="epmq_unrounded"),
                             _COLORS["epmq_unrounded"]),
                            (METHOD_NAMES["epmq_full_unrounded"],
                             _find(rows, merge=merge, method="epmq_full_unrounded", default=True),
                             _COLORS["epmq_full_unrounded"])):
            if r is not None:
                series.append((label, r, c))
        for m in _QUANT_METHODS:
            r = _find(rows, merge=merge, method=m, bits=bits)
            if m in _DEFAULTED:
                r = _find(rows, merge=merge, method=m, bits=bits, default=True)
            if r is not None:
                series.append((f"{METHOD_NAMES[m]} w{bits}", r, _COLORS[m]))
        x = np.arange(len(tasks) + 1)
        width = 0.85 / max(len(series), 1)
        lowest = 0.0
        for i, (label, r, c) in enumerate(series):
            vals = [r["per_task"].get(t, np.nan) for t in tasks] + [r["avg"]]
            lowest = min(lowest, float(np.nanmin(vals)))
            ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label, color=c,
                   alpha=0.55 if label == "FP experts" else 0.9)
        ax.set_xticks(x, [*tasks, "avg"], rotation=30, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(lowest - 5 if lowest < 0 else 0, 105)   # GLUE correlations can be negative
        ax.set_title(f"{MERGE_NAMES.get(merge, merge)}: per-task accuracy")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def plot_bits(rows: Sequence[Row], path: str | Path) -> Path | None:
    """Average accuracy vs bit width for each quantizer (default E-PMQ rows), one panel per merge method."""
    merges = [m for m in _merges(rows) if any(r["merge"] == m and r["bits"] is not None for r in rows)]
    if not merges:
        return None
    fig, axes = _panels(len(merges))
    for ax, merge in zip(axes, merges):
        for m in _QUANT_METHODS:
            pts = sorted((r for r in rows if r["block"] == "main" and r["merge"] == merge and r["method"] == m
                          and r["bits"] is not None and (m not in _DEFAULTED or r["default"])), key=lambda r: r["bits"])
            if pts:
                ax.plot([r["bits"] for r in pts], [r["avg"] for r in pts], "o-", color=_COLORS[m], label=METHOD_NAMES[m])
        _hline(ax, _find(rows, merge=merge, method="fp"), "FP merge", _COLORS["fp"])
        _hline(ax, _find(rows, merge=merge, method="epmq_unrounded"), "E-PMQ unrounded", _COLORS["epmq_unrounded"], "-.")
        _hline(ax, _find(rows, merge=merge, method="epmq_full_unrounded", default=True), "E-PMQ-full unrounded",
               _COLORS["epmq_full_unrounded"], "-.")
        _hline(ax, _find(rows, merge="expert"), "FP experts", _COLORS["expert"], ":")
        bits = sorted({r["bits"] for r in rows if r["merge"] == merge and r["bits"] is not None})
        ax.set_xticks(bits)
        ax.invert_xaxis()
        ax.set_xlabel("weight bits")
        ax.set_ylabel("average test accuracy (%)")
        ax.set_title(f"{MERGE_NAMES.get(merge, merge)}: accuracy vs bits")
        ax.grid(alpha=0.3)
        _legend_below(ax, ncol=2)
    return _save(fig, path)


def plot_all(rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """Writes lambda_sweep.png, per_task.png and accuracy_vs_bits.png (those with data) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_lambda_sweep(rows, out / "lambda_sweep.png"), plot_per_task(rows, out / "per_task.png"),
             plot_bits(rows, out / "accuracy_vs_bits.png")]
    return [p for p in paths if p is not None]
