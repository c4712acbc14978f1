"""Downstream accuracy with the real OpenCompass CLI: PCA and trained checkpoints at 100/50/37.5 %, plus the base model.

Two `opencompass configs/pcallama.py --debug` runs (one per checkpoint; the first also scores the
uncompressed base model), configured only through the config's MKV_* variables:

  MKV_MODEL=outputs/demo/pca MKV_BASE_MODEL=<embedded SmolLM2-135M> MKV_BUDGETS=100,50,37.5 \\
  MKV_SUITE=cpu MKV_DATASETS=piqa,obqa MKV_TEST_RANGE='[0:64]' opencompass configs/pcallama.py --debug -w W
  MKV_MODEL=outputs/demo/matryoshka MKV_BASE_MODEL=none ...  (same items)

The summary CSV OpenCompass writes is parsed, and an accuracy table with the standard error of each
accuracy, sqrt(p (1 - p) / n), is written into docs/benchmarks.md (and docs/accuracy.json).

Every model row scores the same items: the first --items rows (MKV_TEST_RANGE) of each set's fixed
`cpu` subset (hash-selected once, stored in source order; see opencompass_ext/README.md).

  python benchmarks/accuracy.py                   # full run (CPU-sized: ~15-20 min on a shared 2-core box)
  python benchmarks/accuracy.py --items 500 --datasets csqa,piqa,obqa,siqa,boolq    # the whole cpu suite
  python benchmarks/accuracy.py --quick           # CI smoke test: tiny checkpoints, quick suite, temp dir
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, ROOT, header, markdown_table, write_section

BIN = Path(sys.executable).parent
ABBR = {"csqa": "csqa-8shot", "piqa": "piqa", "obqa": "obqa", "siqa": "siqa", "boolq": "boolq"}
CHANCE = {"csqa": 0.2, "piqa": 0.5, "obqa": 0.25, "siqa": 1 / 3, "boolq": None}


def rel(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def summary_csv(work_dir: Path) -> Path:
    found = sorted(glob.glob(str(work_dir / "*" / "summary" / "summary_*.csv")))
    if not found:
        raise FileNotFoundError(f"no OpenCompass summary CSV under {work_dir}")
    return Path(found[-1])


def parse_summary(path: Path) -> dict[str, dict[str, float | None]]:
    """{model abbr: {dataset abbr: accuracy in %}} from OpenCompass's summary CSV."""
    out: dict[str, dict[str, float | None]] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        models = [c for c in reader.fieldnames or [] if c not in ("dataset", "version", "metric", "mode")]
        for row in reader:
            for model in models:
                value = row[model].strip()
                try:
                    out.setdefault(model, {})[row["dataset"]] = float(value)
                except ValueError:
                    out.setdefault(model, {})[row["dataset"]] = None
    return out


def item_counts(suite: str, names: list[str], items: int | None) -> dict[str, int]:
    from opencompass_ext import datasets as ds

    counts = {}
    for name in names:
        with open(ds.dataset_path(name, suite)) as handle:
            total = sum(1 for line in handle if line.strip())
        counts[name] = min(total, items) if items else total
    return counts


def run_opencompass(env_vars: dict[str, str], work_dir: Path, log: list[dict]) -> float:
    env = dict(os.environ)
    env.update(env_vars)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [str(BIN / "opencompass"), "configs/pcallama.py", "--debug", "-w", str(work_dir)]
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_vars.items())
    shown += " opencompass configs/pcallama.py --debug -w " + rel(work_dir)
    print(f"$ {shown}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (work_dir / "opencompass.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"opencompass failed ({proc.returncode}); log: {work_dir / 'opencompass.log'}")
    log.append({"command": shown, "seconds": seconds})
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def stderr_points(p_percent: float, n: int) -> float:
    p = p_percent / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pca", default="outputs/demo/pca")
    parser.add_argument("--trained", default="outputs/demo/matryoshka")
    parser.add_argument("--base-model", default=None, help="uncompressed checkpoint (default: the embedded model)")
    parser.add_argument("--budgets", default="100,50,37.5")
    parser.add_argument("--datasets", default="piqa,obqa", help="out of csqa,piqa,obqa,siqa,boolq")
    parser.add_argument("--items", type=int, default=64, help="items per set (MKV_TEST_RANGE=[0:N]); 0 = all")
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work-dir", default=None, help="default outputs/bench/accuracy (--quick: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny checkpoints, 2 items, no docs")
    args = parser.parse_args()

    if args.quick:
        tmp = Path(args.work_dir or tempfile.mkdtemp(prefix="mkv-accuracy-quick-"))
        from opencompass_ext.testing import build_tiny_checkpoints

        llama, pca = build_tiny_checkpoints(str(tmp / "ckpt"))
        args.pca = args.trained = pca
        args.base_model, args.suite, args.items, args.datasets, args.budgets = llama, "quick", 2, "piqa,obqa", "100,50"
        work = tmp
    else:
        work = Path(args.work_dir or ROOT / "outputs/bench/accuracy")
    if args.base_model is None:
        from plugin import assets

        args.base_model = str(assets.embedded_model_dir())
    work.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    common_env = {"MKV_BUDGETS": args.budgets, "MKV_SUITE": args.suite, "MKV_DATASETS": ",".join(names),
                  "MKV_BATCH_SIZE": str(args.batch_size)}
    if args.items:
        common_env["MKV_TEST_RANGE"] = f"[0:{args.items}]"
    log: list[dict] = []
    results: dict[str, dict[str, float | None]] = {}
    runs = [("pca", args.pca, args.base_model), ("matryoshka", args.trained, "none")]
    for label, model, base in runs:
        run_dir = work / label
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        env_vars = {"MKV_MODEL": rel(model), "MKV_BASE_MODEL": rel(base) if base != "none" else "none", **common_env}
        run_opencompass(env_vars, run_dir, log)
        for abbr, scores in parse_summary(summary_csv(run_dir)).items():
            name = abbr if abbr == "base-uncompressed" else abbr.replace("pcallama", label)
            results[name] = scores

    counts = item_counts(args.suite, names, args.items)
    suffix = "" if args.suite == "full" else f"-{args.suite}"
    set_abbrs = {n: ABBR[n] + suffix for n in names}
    table_rows, records = [], []
    for model, scores in results.items():
        cells = [model]
        for name in names:
            acc = scores.get(set_abbrs[name])
            se = stderr_points(acc, counts[name]) if acc is not None else None
            records.append({"model": model, "dataset": name, "n": counts[name], "accuracy": acc, "stderr": se})
            cells.append(f"{acc:.1f} ± {se:.1f}" if acc is not None else "-")
        avg = scores.get("mkv-average")
        cells.append(f"{avg:.1f}" if avg is not None else "-")
        table_rows.append(cells)
    result = {"meta": {"suite": args.suite, "items": counts, "budgets": args.budgets, "commands": log},
              "rows": records}
    if args.quick:
        (work / "accuracy.json").write_text(json.dumps(result, indent=1))
        print(markdown_table(["model"] + names + ["average"], table_rows))
        print(f"accuracy quick run ok: {work / 'accuracy.json'}")
        return
    (DOCS / "accuracy.json").write_text(json.dumps(result, indent=1))
    body = header("python benchmarks/accuracy.py") + "\n"
    body += (f"OpenCompass 0.5.4 (`opencompass configs/pcallama.py --debug`, log-likelihood scoring as in the "
             f"paper) on the offline suite: the first {args.items or 'all'} items of each set's fixed `{args.suite}` "
             f"subset ({', '.join(f'{set_abbrs[n]}: n = {counts[n]}' for n in names)}), the same items for every row; "
             f"float32, batch {args.batch_size}. `pca-*` = `{rel(args.pca)}` at uniform budgets, `matryoshka-*` = "
             f"`{rel(args.trained)}`; `base-uncompressed` = the embedded SmolLM2-135M with its full cache. "
             "Cells: accuracy in % ± its standard error sqrt(p(1-p)/n) in points.\n\n")
    body += markdown_table(["model"] + [set_abbrs[n] for n in names] + ["average"], table_rows) + "\n\n"
    chance = ", ".join(f"{set_abbrs[n]} {100 * CHANCE[n]:.0f}%" for n in names if CHANCE.get(n))
    worst = max(stderr_points(50, c) for c in counts.values())
    body += (f"Chance level: {chance}. With n = {min(counts.values())}-{max(counts.values())} items per set the "
             f"standard error of one accuracy is up to {worst:.1f} points, so differences of a few points between "
             "rows are within noise (differences between two rows on the same items are somewhat less noisy, as "
             "their errors are correlated). At 100 % the PcaLlama rows compute the same function as the base model "
             "(orthogonal bases at full rank), so they must match it up to float round-off. Sized for the CPU: "
             "`--items 500 --datasets csqa,piqa,obqa,siqa,boolq` runs the whole cpu suite (about 1.5 CPU-hours "
             "per model row).\n\nCommands and wall-clock time:\n\n```bash\n")
    body += "".join(f"{e['command']}   # {e['seconds']:.0f} s\n" for e in log) + "```\n"
    write_section("accuracy", "Downstream accuracy (OpenCompass)", body)
    print(markdown_table(["model"] + names + ["average"], table_rows))
    print(f"wrote {DOCS / 'accuracy.json'} and the 'accuracy' section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
