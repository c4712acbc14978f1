"""Run every benchmark in sequence (never two at once: the CPU is the scarce resource).

  python benchmarks/run_all.py            # full runs; each writes its section of docs/benchmarks.md (`make bench`)
  python benchmarks/run_all.py --quick    # CI smoke tests: tiny sizes, nothing written to docs/
  python benchmarks/run_all.py --only quality,accuracy
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# timing-sensitive ones first; accuracy reads the rank files that quality writes
SCRIPTS = ["decode_memory", "training_cost", "quality", "accuracy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", default=",".join(SCRIPTS), help=f"comma list out of {','.join(SCRIPTS)}")
    parser.add_argument("--keep-going", action="store_true", help="run the rest after a failure")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {SCRIPTS}")
    failed = []
    for name in names:
        cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if args.quick else [])
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, check=False).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
            if not args.keep_going:
                break
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
