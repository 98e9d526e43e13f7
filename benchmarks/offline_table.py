"""Prints the full table of an offline benchmark run from its results.json.

Usage:
    python benchmarks/offline_table.py [runs/offline_8task/results.json] [--markdown]

The rows, the blocks and the numbers are those of ``epmq run`` (see epmq_jax.report); this
script adds the run's timings, machine and versions underneath, so the output can be pasted
into a note as is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epmq_jax import report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default="runs/offline_8task/results.json", help="results.json path")
    p.add_argument("--markdown", action="store_true", help="print markdown tables instead of text")
    args = p.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        p.error(f"no results file at {path} (run `epmq run --config configs/offline_8task.py` first)")
    doc = report.read_json(path)
    rows = doc["rows"]
    if args.markdown:
        print(report.format_markdown(rows))
    else:
        print(report.format_table(rows, title=f"Test accuracy (%) of {doc.get('config', {}).get('name', path.parent.name)}; "
                                  "every choice made on validation"))
    print()
    for k, v in doc.get("timings", {}).items():
        print(f"{k:<28} {v:8.1f} s")
    m, v = doc.get("machine", {}), doc.get("versions", {})
    print(f"machine: {m.get('platform')}, {m.get('cpu_count')} CPUs, {m.get('backend')} ({m.get('device_kind')})")
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
