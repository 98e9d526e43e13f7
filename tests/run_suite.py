"""Runs the whole test suite, each test file in its own pytest process, ``-j`` files at a time.

Why not one ``pytest tests`` process: after a few hundred tests (thousands of XLA programs
compiled in one process) jaxlib 0.10.2's CPU compiler crashed with SIGSEGV twice in the same
late test, which passes in a fresh process; one process per file bounds what a process
accumulates and lets the two cores run two files at once. ``make test`` (and so CI) runs this.

    python tests/run_suite.py [-j 2] [pytest args ...]      # e.g. -x, -k name

Prints each file's pytest summary line as it finishes, the whole output of every failing file,
and exits non-zero when any file failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# longest first, so the two workers finish together (measured seconds on the 2-core CPU)
_SLOW_FIRST = ("test_calib_full.py", "test_export_hf.py", "test_offline_llm.py", "test_multihost.py",
               "test_cli.py", "test_pipeline_e2e.py", "test_runner.py", "test_calib_scale.py")


def _run(path: Path, extra: list[str]) -> tuple[Path, int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "pytest", "-q",
                           "-p", "no:cacheprovider", str(path.relative_to(ROOT)), *extra],
                          cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    return path, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=2, help="files run at once")
    args, extra = ap.parse_known_args()
    files = sorted((ROOT / "tests").glob("test_*.py"))
    files.sort(key=lambda f: (f.name not in _SLOW_FIRST,
                              _SLOW_FIRST.index(f.name) if f.name in _SLOW_FIRST else 0))
    t0 = time.monotonic()
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for path, rc, out, secs in pool.map(lambda f: _run(f, extra), files):
            lines = [ln for ln in out.strip().splitlines() if ln.strip()]
            summary = lines[-1] if lines else "(no output)"
            print(f"{path.name:32s} {secs:6.0f} s  {summary}", flush=True)
            if rc not in (0, 5):        # 5: nothing collected (e.g. -k matched no test there)
                failed.append((path, out))
    for path, out in failed:
        print(f"\n{'=' * 30} {path.name} {'=' * 30}\n{out}")
    print(f"\n{len(files)} files, {len(failed)} failed"
          + (f" ({', '.join(p.name for p, _ in failed)})" if failed else "")
          + f", {time.monotonic() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
