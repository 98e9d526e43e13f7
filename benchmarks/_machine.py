"""What every benchmark prints and how it times: the machine, its load, min-of-N interleaved runs.

A timing taken on a loaded machine is wrong, not noisy. Every script in ``benchmarks/``:

- prints :func:`machine_line` (CPU model, cores, memory, JAX backend and devices) and the load
  average before and after (:func:`load_line`; the figure after includes the benchmark's own
  threads, so it is not what decides), and the CPU the *other* processes used while it ran
  (:func:`outside_cpu`: all busy CPU time from ``/proc/stat`` minus this process's own);
- calls :func:`check_quiet` before timing: when the 1-minute load average exceeds half the
  cores it refuses to run (exit 3) unless ``--allow-load`` is given, and then every table it
  prints is marked ``LOADED MACHINE: figures not valid``; :func:`finish` adds the same mark
  when other processes used more than half a core on average during the run;
- times competing implementations with :func:`interleaved_min`: the candidates run in turn,
  round after round, and each one's figure is its minimum over the rounds, so a burst of
  outside work hits all of them alike and cannot favour one.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_gib() -> float:
    """Total memory in GiB (NaN if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine_line() -> str:
    """One line naming the machine and the JAX backend the benchmark runs on."""
    import jax

    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, {mem_gib():.0f} GiB; "
            f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
            f"jax {jax.__version__} backend {jax.default_backend()} "
            f"({len(devs)} x {', '.join(kinds)})")


def _busy_seconds() -> float | None:
    """All CPUs' busy time since boot in seconds (``/proc/stat``), or None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)      # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


_START: dict[str, float | None] = {}


def outside_cpu() -> float | None:
    """Average number of cores other processes kept busy since :func:`check_quiet`, or None."""
    busy = _busy_seconds()
    if busy is None or _START.get("busy") is None:
        return None
    wall = time.monotonic() - _START["wall"]
    if wall <= 0:
        return None
    return max(0.0, (busy - _START["busy"]) - (_own_seconds() - _START["own"])) / wall


def load_line(when: str) -> str:
    """``load average (when): 1m 5m 15m (N cores)``."""
    one, five, fifteen = os.getloadavg()
    return f"load average ({when}): {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


LOADED_MARK = "LOADED MACHINE: figures not valid"


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--allow-load`` (run although the machine is loaded; tables are marked)."""
    parser.add_argument("--allow-load", action="store_true",
                        help="run even when the load average exceeds half the cores (the output is "
                             f"marked '{LOADED_MARK}')")


def check_quiet(allow_load: bool) -> bool:
    """Prints the machine and its load; refuses a loaded machine unless ``allow_load``.

    Returns:
      True when the machine is loaded (load average over half the cores) and the caller must
      mark its tables with :data:`LOADED_MARK`.
    """
    print(machine_line())
    print(load_line("before"))
    _START.update(busy=_busy_seconds(), own=_own_seconds(), wall=time.monotonic())
    loaded = os.getloadavg()[0] > (os.cpu_count() or 1) / 2
    if loaded and not allow_load:
        print(f"refusing to time on a loaded machine (1-minute load {os.getloadavg()[0]:.2f} > "
              f"{(os.cpu_count() or 1) / 2:g}); rerun when it is quiet, or pass --allow-load "
              "to get figures marked as invalid", file=sys.stderr)
        raise SystemExit(3)
    if loaded:
        print(LOADED_MARK)
    return loaded


def finish(loaded: bool) -> None:
    """Prints the load after the run, the CPU other processes used during it, and the mark
    when the machine was loaded before or others used over half a core meanwhile."""
    print(load_line("after") + " (includes this benchmark's own threads)")
    other = outside_cpu()
    if other is not None:
        print(f"other processes during the run: {other:.2f} cores on average")
    if loaded or (other is not None and other > 0.5):
        print(LOADED_MARK)


def interleaved_min(candidates: Mapping[str, Callable[[], object]], rounds: int = 5,
                    warmup: int = 1) -> dict[str, list[float]]:
    """Times each candidate ``rounds`` times, interleaved (a, b, c, a, b, c, ...).

    Args:
      candidates: name -> a call that does the work and blocks until it is finished (e.g.
        ends in ``jax.block_until_ready``).
      rounds: timed rounds.
      warmup: untimed rounds first (compilation, caches).

    Returns:
      name -> the list of wall seconds of its timed rounds (take ``min`` for the figure).
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times
