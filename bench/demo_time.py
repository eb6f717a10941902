"""Time the offline demo (`mmkd demo`) from a cold interpreter and check it against its 15-minute budget.

    .venv/bin/python bench/demo_time.py                 # the full demo into runs/demo_time
    .venv/bin/python bench/demo_time.py --budget 900 --out /tmp/demo

The demo runs in a fresh subprocess (so imports count, as in `make demo`); the stage timings come from its
results.json. The load average before and after is printed: on a shared machine the figure is pessimistic.
Exit status 1 when the demo takes longer than the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo_time", help="Demo output folder.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=900.0, help="Budget in seconds (default 15 minutes).")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    code = f"from mmkd.demo import demo_command; demo_command(out={args.out!r}, seed={args.seed})"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    if proc.returncode != 0:
        print(f"demo failed with exit status {proc.returncode}")
        return proc.returncode
    results = json.loads((Path(args.out) / "results.json").read_text())
    print("\nstage                      seconds")
    for name, seconds in results["setting"]["seconds"].items():
        print(f"{name:26s} {seconds:7.1f}")
    print(f"{'wall (with imports)':26s} {wall:7.1f}")
    print(f"cpu cores {os.cpu_count()}, torch threads {results['setting']['threads']}, "
          f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    ok = wall <= args.budget
    print(f"{'within' if ok else 'OVER'} the budget: {wall:.0f} s of {args.budget:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
