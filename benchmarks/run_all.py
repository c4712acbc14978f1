"""Run every benchmark in sequence (never two at once: the CPU is the scarce resource).

  python -m benchmarks.run_all            # full runs; each writes its section of docs/benchmarks.md (`make bench`)
  python -m benchmarks.run_all --quick    # CI smoke tests: tiny sizes, nothing written to docs/
  python -m benchmarks.run_all --only quality,accuracy
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
from benchmarks.report import header, markdown_table, write_section

# timing-sensitive ones first; accuracy reads the rank files that quality writes
SCRIPTS = ["decode_memory", "training_cost", "quality", "accuracy", "key_centring", "weight_pca_diagnostic"]
# a full pass recomputes everything (quality would otherwise reuse `make demo`'s uniform sweep)
FULL_ARGS = {"quality": ["--no-reuse"]}


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
    failed, times = [], []
    began = datetime.datetime.now()
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else FULL_ARGS.get(name, []))
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, check=False, cwd=HERE.parent).returncode
        seconds = time.perf_counter() - start
        times.append([f"`python {' '.join(cmd[1:])}`", f"{seconds / 60:.1f}", rc])
        print(f"=== {name}: exit {rc} after {seconds:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
            if not args.keep_going:
                break
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if not args.quick and names == SCRIPTS:
        ended = datetime.datetime.now()
        body = header("python -m benchmarks.run_all") + (
            f"\nEvery section below was written by this one pass (`make bench`), "
            f"{began:%Y-%m-%d %H:%M} to {ended:%H:%M} UTC, in this order:\n\n")
        body += markdown_table(["script", "minutes", "exit"], times) + "\n"
        write_section("run_all", "How this file was produced", body, first=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
