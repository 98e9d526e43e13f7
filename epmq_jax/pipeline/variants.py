"""The rows of a run: which (merge, method, bits, switches) variants a config asks for.

:func:`plan` turns a config into the ordered list of :class:`Variant` s the runner computes:
the float references (FP experts, and the multi-task model where the model pool has one), then
per merge method (``merge.methods``: ``ta``, ``ties``, ``regmean``) the FP merge, E-PMQ
unrounded and every quantizer at every bit width, then the E-PMQ anchor-strength sweep and the
switch ablations, then E-PMQ-full's rows (``calib.full``: this project's extension, its
settings chosen on validation by :func:`epmq_jax.pipeline.stages.select_full`, each piece alone
and all together). Nothing here touches models or data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

#: E-PMQ switches a variant carries (the row keys of :data:`epmq_jax.report.SWITCH_KEYS`).
SWITCHES = ("lam", "anchor", "target", "alpha", "task_weights", "rounding")
#: Merge methods the runner knows.
MERGES = ("ta", "ties", "regmean")
#: Quantizers (rows with ``bits``).
QUANTIZERS = ("rtn", "gptq", "awq", "epmq")
#: E-PMQ-full's row methods (rounded, unrounded).
FULL_METHODS = ("epmq_full", "epmq_full_unrounded")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One table row to compute.

    Attributes:
      merge, method, bits, block, default: as in the row schema of :mod:`epmq_jax.report`.
      tag: what tells a sweep / ablation row apart (``"lam1"``, ``"target-mix"``; the piece of
        an E-PMQ-full ``full`` block row, ``"bias"``), else ``""``.
      switches: the E-PMQ switches as sorted ``(key, value)`` pairs (empty for other methods;
        E-PMQ-full's λ is the validation-chosen one, filled in by the runner).
    """

    merge: str
    method: str
    bits: int | None = None
    block: str = "main"
    default: bool = False
    tag: str = ""
    switches: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """File-name-safe id, e.g. ``ta_gptq_w4``, ``ta_epmq_w4_lam1``, ``ta_epmq_w4_target-mix``."""
        out = f"{self.merge}_{self.method}" + (f"_w{self.bits}" if self.bits is not None else "")
        return out + (f"_{self.tag}" if self.tag else "")

    @property
    def sw(self) -> dict[str, Any]:
        return dict(self.switches)

    @property
    def piece(self) -> str:
        """The E-PMQ-full piece of the row: its tag in the ``full`` block, ``"all"`` in ``main``."""
        return self.tag if self.block == "full" else "all"

    @property
    def calibrated(self) -> bool:
        """Whether the variant runs the calibration driver (every row but the float references)."""
        return self.method != "fp"


def epmq_switches(calib: ml_collections.ConfigDict, **changes: Any) -> tuple[tuple[str, Any], ...]:
    """The E-PMQ switches of the config's ``calib`` section with ``changes`` applied, as sorted pairs.

    ``alpha`` is kept only for ``target="mix"``.
    """
    sw = {"lam": float(calib.lam), "anchor": calib.anchor, "target": calib.target,
          "alpha": float(calib.alpha), "task_weights": calib.task_weights, "rounding": calib.rounding}
    sw.update(changes)
    if sw["target"] != "mix":
        sw["alpha"] = None
    return tuple(sorted(sw.items()))


def parse_ablation(text: str) -> dict[str, Any]:
    """``"target=mix"`` / ``"anchor=weight,lam=1"`` -> the switch changes of one ablation row.

    Raises:
      ValueError: a malformed item or an unknown switch.
    """
    changes: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (p.strip() for p in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"calib.ablations item {text!r}: expected KEY=VALUE[,KEY=VALUE]")
        if key not in SWITCHES:
            raise ValueError(f"calib.ablations item {text!r}: unknown switch {key!r}; "
                             f"expected one of {', '.join(SWITCHES)}")
        if key in ("lam", "alpha"):
            try:
                changes[key] = float(value)
            except ValueError:
                raise ValueError(f"calib.ablations item {text!r}: {key} must be a number, "
                                 f"got {value!r}") from None
        else:
            changes[key] = value
    return changes


def methods_for(cfg: ml_collections.ConfigDict, merge: str) -> tuple[str, ...]:
    """The quantizers run on ``merge``: ``quant.methods_by_merge[merge]`` if set, else ``quant.methods``."""
    by_merge = cfg.quant.get("methods_by_merge") or {}
    return tuple(by_merge.get(merge, cfg.quant.methods))


def _tag(changes: dict[str, Any]) -> str:
    return "_".join(f"{k}-{v:g}" if isinstance(v, float) else f"{k}-{v}" for k, v in changes.items())


def plan(cfg: ml_collections.ConfigDict, *, has_multitask: bool = False) -> list[Variant]:
    """The variants of a run, in computation order.

    FP experts (and the multi-task model when ``has_multitask``); per merge method: FP merge,
    E-PMQ unrounded (if ``calib.unrounded``, default on), then per bit width each quantizer of
    :func:`methods_for` (E-PMQ is the default row); then, for ``calib.sweep_merge`` at
    ``calib.sweep_bits``, the λ sweep (``calib.lam_sweep`` minus the default λ) and the ablations
    (``calib.ablations``); then, when ``calib.full`` is set, per merge of ``calib.full.merges``
    the E-PMQ-full rows: in ``main`` the default (validation-chosen settings, every piece) at
    each bit width and unrounded, and in the ``full`` block every piece of ``calib.full.pieces``
    alone plus ``none`` (every piece off: E-PMQ with the chosen λ and damping) at each bit
    width of ``calib.full.piece_bits`` (default ``quant.bits``) and unrounded.
    """
    calib, quant = cfg.calib, cfg.quant
    out = [Variant("expert", "fp")]
    if has_multitask:
        out.append(Variant("multitask", "fp"))
    for merge in cfg.merge.methods:
        out.append(Variant(merge, "fp"))
        if calib.get("unrounded", True):
            out.append(Variant(merge, "epmq_unrounded", switches=epmq_switches(calib, rounding="none")))
        for bits in quant.bits:
            for method in methods_for(cfg, merge):
                is_epmq = method == "epmq"
                out.append(Variant(merge, method, int(bits), default=is_epmq,
                                   switches=epmq_switches(calib) if is_epmq else ()))
    if calib.lam_sweep or calib.ablations:
        sweep = dict(merge=calib.sweep_merge, method="epmq", bits=int(calib.sweep_bits))
        for lam in calib.lam_sweep:
            if float(lam) != float(calib.lam):
                out.append(Variant(**sweep, block="sweep", tag=f"lam{float(lam):g}",
                                   switches=epmq_switches(calib, lam=float(lam))))
        for text in calib.ablations:
            changes = parse_ablation(text)
            out.append(Variant(**sweep, block="ablation", tag=_tag(changes),
                               switches=epmq_switches(calib, **changes)))
    full = calib.get("full")
    if full:
        widths = [*(int(b) for b in quant.bits), None]
        piece_widths = [*(int(b) for b in full.get("piece_bits") or quant.bits), None]
        for merge in full.merges:
            for bits in widths:
                out.append(_full_variant(calib, merge, bits, block="main", default=True))
            for piece in ("none", *full.pieces):
                for bits in piece_widths:
                    out.append(_full_variant(calib, merge, bits, block="full", tag=piece))
    return out


def _full_variant(calib: ml_collections.ConfigDict, merge: str, bits: int | None, **kw: Any) -> Variant:
    method, rounding = ("epmq_full", calib.rounding) if bits is not None else ("epmq_full_unrounded", "none")
    return Variant(merge, method, bits, switches=epmq_switches(calib, rounding=rounding), **kw)
