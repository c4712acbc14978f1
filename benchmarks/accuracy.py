"""Downstream accuracy with the real OpenCompass CLI: PCA and trained checkpoints at 100/50/37.5 %, plus the base model.

Two `opencompass configs/pcallama.py --debug` runs (one per checkpoint; the first also scores the
uncompressed base model, the second also the trained checkpoint with the per-head ranks that
benchmarks/quality.py searched), configured only through the config's MKV_* variables:

  MKV_MODEL=outputs/demo/pca MKV_BASE_MODEL=<embedded SmolLM2-135M> MKV_BUDGETS=100,50,37.5 \\
  MKV_SUITE=cpu MKV_TEST_RANGE='[0:500]' opencompass configs/pcallama.py --debug -w W
  MKV_MODEL=outputs/demo/matryoshka MKV_BASE_MODEL=none MKV_RANK_FILE=ranks-0.5.json,ranks-0.375.json ...

The summary CSV OpenCompass writes is parsed, and an accuracy table with the standard error of each
accuracy, sqrt(p (1 - p) / n), is written into docs/benchmarks.md (and docs/accuracy.json), with
each row's agreement with the base model's per-item predictions (read from OpenCompass's prediction
files). Before that, `python -m opencompass_ext.bench` times the configs' prefix-sharing inferencer
against OpenCompass's label-by-label PPLInferencer on a few items (same scores, the speed-up).

Every model row scores the same items: the first --items rows (MKV_TEST_RANGE) of each set's fixed
`cpu` subset (hash-selected once, stored in source order; see opencompass_ext/README.md).

  python benchmarks/accuracy.py                   # full run: 500 items of each of the five sets
  python benchmarks/accuracy.py --items 64 --datasets piqa,obqa     # a smaller run
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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, ROOT, header, markdown_table, write_section
from plots import accuracy_png

from opencompass_ext.models import budget_abbr, format_budget

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


def load_predictions(run_dir: Path) -> dict[str, dict[str, list[str]]]:
    """{model abbr: {dataset abbr: per-item predictions}} from OpenCompass's prediction files."""
    out: dict[str, dict[str, list[str]]] = {}
    for path in glob.glob(str(run_dir / "*" / "predictions" / "*" / "*.json")):
        model, dataset = Path(path).parent.name, Path(path).stem
        with open(path) as handle:
            items = json.load(handle)
        out.setdefault(model, {})[dataset] = [items[k]["prediction"] for k in sorted(items, key=int)]
    return out


def row_name(abbr: str, label: str, rank_budgets: dict[str, float]) -> str:
    """OpenCompass abbr of a run -> table row: pcallama-50% -> matryoshka-50%, rank files -> -searched-."""
    if abbr == "base-uncompressed":
        return abbr
    for stem_abbr, budget in rank_budgets.items():
        if abbr == stem_abbr:
            return f"{label}-searched-{format_budget(budget)}"
    return abbr.replace("pcallama", label)


def speed_check(model: str, budget: float, items: int, names: list[str]) -> list[dict]:
    """Prefix-sharing vs label-by-label inference on the same items (python -m opencompass_ext.bench)."""
    from opencompass_ext.bench import run

    print(f"$ python -m opencompass_ext.bench --model {rel(model)} --budget {budget} --items {items} "
          f"--datasets {','.join(names)} --batch-sizes 16", flush=True)
    return run(model, budget, names, items, [16], suite="cpu" if items > 8 else "quick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pca", default="outputs/demo/pca")
    parser.add_argument("--trained", default="outputs/demo/matryoshka")
    parser.add_argument("--base-model", default=None, help="uncompressed checkpoint (default: the embedded model)")
    parser.add_argument("--budgets", default="100,50,37.5")
    parser.add_argument("--rank-files", default="outputs/bench/quality/ranks-0.5.json,outputs/bench/quality/ranks-0.375.json",
                        help="per-head rank files scored on the trained checkpoint (missing ones are skipped; "
                             "benchmarks/quality.py writes these); '' for none")
    parser.add_argument("--datasets", default="csqa,piqa,obqa,siqa,boolq", help="out of csqa,piqa,obqa,siqa,boolq")
    parser.add_argument("--items", type=int, default=500, help="items per set (MKV_TEST_RANGE=[0:N]); 0 = all")
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--speed-items", type=int, default=32,
                        help="items per set of the prefix-sharing vs PPLInferencer timing; 0 skips it")
    parser.add_argument("--work-dir", default=None, help="default outputs/bench/accuracy (--quick: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny checkpoints, 2 items, no docs")
    args = parser.parse_args()

    if args.quick:
        tmp = Path(args.work_dir or tempfile.mkdtemp(prefix="mkv-accuracy-quick-"))
        from opencompass_ext.testing import build_tiny_checkpoints

        llama, pca = build_tiny_checkpoints(str(tmp / "ckpt"))
        args.pca = args.trained = pca
        args.base_model, args.suite, args.items, args.datasets, args.budgets = llama, "quick", 2, "piqa,obqa", "100,50"
        from plugin.ranks import write_rank_file

        # a mixed per-head table on the tiny model (2 layers, 2 KV heads, head_dim 16) at 50%
        ranks = {"key": [[4, 12], [8, 8]], "value": [[16, 4], [2, 10]]}
        args.rank_files = str(write_rank_file(tmp / "ranks-quick.json", ranks, 16))
        args.speed_items = 2
        work = tmp
    else:
        work = Path(args.work_dir or ROOT / "outputs/bench/accuracy")
    if args.base_model is None:
        from plugin import assets

        args.base_model = str(assets.embedded_model_dir())
    work.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    rank_files = [f for f in args.rank_files.split(",") if f.strip() and Path(f).is_file()]
    rank_budgets = {budget_abbr(rank_file=f): json.loads(Path(f).read_text())["budget"] for f in rank_files}

    speed = []
    if args.speed_items:
        speed_names = [n for n in ("csqa", "piqa", "boolq") if n in names] or names[:1]
        speed = speed_check(args.trained, 0.375 if not args.quick else 0.5, args.speed_items, speed_names)

    common_env = {"MKV_BUDGETS": args.budgets, "MKV_SUITE": args.suite, "MKV_DATASETS": ",".join(names),
                  "MKV_BATCH_SIZE": str(args.batch_size)}
    if args.items:
        common_env["MKV_TEST_RANGE"] = f"[0:{args.items}]"
    log: list[dict] = []
    results: dict[str, dict[str, float | None]] = {}
    predictions: dict[str, dict[str, list[str]]] = {}
    runs = [("pca", args.pca, args.base_model, []), ("matryoshka", args.trained, "none", rank_files)]
    for label, model, base, files in runs:
        run_dir = work / label
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        env_vars = {"MKV_MODEL": rel(model), "MKV_BASE_MODEL": rel(base) if base != "none" else "none", **common_env}
        if files:
            env_vars["MKV_RANK_FILE"] = ",".join(rel(f) for f in files)
        run_opencompass(env_vars, run_dir, log)
        for abbr, scores in parse_summary(summary_csv(run_dir)).items():
            results[row_name(abbr, label, rank_budgets)] = scores
        for abbr, preds in load_predictions(run_dir).items():
            predictions[row_name(abbr, label, rank_budgets)] = preds

    counts = item_counts(args.suite, names, args.items)
    suffix = "" if args.suite == "full" else f"-{args.suite}"
    set_abbrs = {n: ABBR[n] + suffix for n in names}
    base_preds = predictions.get("base-uncompressed", {})
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
        same = total = 0
        for dataset, preds in predictions.get(model, {}).items():
            ref = base_preds.get(dataset, [])
            same += sum(a == b for a, b in zip(preds, ref))
            total += min(len(preds), len(ref))
        cells.append(f"{100 * same / total:.1f}" if total else "-")
        table_rows.append(cells)
    result = {"meta": {"suite": args.suite, "items": counts, "budgets": args.budgets, "rank_files": rank_budgets,
                       "commands": log, "speed": speed}, "rows": records}
    headers = ["model"] + [set_abbrs[n] for n in names] + ["average", "same prediction as base, %"]
    if args.quick:
        (work / "accuracy.json").write_text(json.dumps(result, indent=1))
        accuracy_png(result, work / "accuracy.png")
        print(markdown_table(headers, table_rows))
        print(f"accuracy quick run ok: {work / 'accuracy.json'}")
        return
    (DOCS / "accuracy.json").write_text(json.dumps(result, indent=1))
    accuracy_png(result, DOCS / "accuracy.png")
    cmd = "python benchmarks/accuracy.py"
    defaults = {"--items": (args.items, 500), "--datasets": (args.datasets, "csqa,piqa,obqa,siqa,boolq")}
    cmd += "".join(f" {flag} {value}" for flag, (value, default) in defaults.items() if value != default)
    body = header(cmd) + "\n"
    body += (f"OpenCompass 0.5.4 (`opencompass configs/pcallama.py --debug`, log-likelihood scoring as in the "
             f"paper) on the offline suite: the first {args.items or 'all'} items of each set's fixed `{args.suite}` "
             f"subset ({', '.join(f'{set_abbrs[n]}: n = {counts[n]}' for n in names)}), the same items for every row; "
             f"float32. `pca-*` = `{rel(args.pca)}` at uniform budgets, `matryoshka-*` = `{rel(args.trained)}` "
             "(uniform), `matryoshka-searched-*` = the trained checkpoint with the per-head rank files of the quality "
             "section (`mkv search-budget`); `base-uncompressed` = the embedded SmolLM2-135M with its full cache. "
             "Cells: accuracy in % ± its standard error sqrt(p(1-p)/n) in points. The last column: the share of all "
             "scored items on which the row predicts the same answer as the base model.\n\n")
    body += markdown_table(headers, table_rows) + "\n\n![accuracy by model row](accuracy.png)\n\n"
    chance = ", ".join(f"{set_abbrs[n]} {100 * CHANCE[n]:.0f}%" for n in names if CHANCE.get(n))
    worst = max(stderr_points(50, c) for c in counts.values())
    body += (f"Chance level: {chance} (boolq: the majority answer). With n = {min(counts.values())}-"
             f"{max(counts.values())} items per set the standard error of one accuracy is up to {worst:.1f} points; "
             "differences between two rows on the same items are less noisy than that, as their errors are "
             "correlated (the agreement column shows how many answers actually change). At 100 % the PcaLlama rows "
             "compute the same function as the base model (orthogonal bases at full rank), so they must match it "
             "up to float round-off.\n\n")
    if speed:
        body += ("Evaluation speed: the configs use `PrefixSharingPPLInferencer` (opencompass_ext/inferencer.py): "
                 "the choices of an item are scored together, and the token prefix they share (and, for the 8-shot "
                 "set, the in-context examples shared by all items) runs once through the model, the KV cache "
                 "walked from item to item. Timed against OpenCompass's label-by-label `PPLInferencer` (batch 16) "
                 f"on the trained checkpoint at 37.5%, first {args.speed_items} items:\n\n")
        body += markdown_table(
            ["set", "PPLInferencer items/s", "prefix sharing items/s", "speed-up", "same prediction",
             "largest score difference"],
            [[r["dataset"], f"{r['items'] / r['label_by_label_s']:.2f}", f"{r['items'] / r['prefix_sharing_s']:.2f}",
              f"{r['speedup']:.1f}x", f"{r['same_predictions']}/{r['items']}", f"{r['max_score_diff']:.1e}"]
             for r in speed]) + "\n\n"
    body += "Commands and wall-clock time:\n\n```bash\n"
    body += "".join(f"{e['command']}   # {e['seconds']:.0f} s\n" for e in log) + "```\n"
    write_section("accuracy", "Downstream accuracy (OpenCompass)", body)


if __name__ == "__main__":
    main()
