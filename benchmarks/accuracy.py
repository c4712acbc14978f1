"""Downstream accuracy with the real OpenCompass CLI: PCA and trained checkpoints at 100/50/37.5 %, plus the base model.

Two `opencompass configs/pcallama.py --debug` runs (one per checkpoint; the first also scores the
uncompressed base model, the second also the trained checkpoint with the per-head ranks that
benchmarks/quality.py searched), configured only through the config's MKV_* variables:

  MKV_MODEL=outputs/demo/pca MKV_BASE_MODEL=<embedded SmolLM2-135M> MKV_BUDGETS=100,50,37.5 \\
  MKV_SUITE=cpu MKV_TEST_RANGE='[0:500]' opencompass configs/pcallama.py --debug -w W
  MKV_MODEL=outputs/demo/matryoshka MKV_BASE_MODEL=none MKV_RANK_FILE=ranks-0.5.json,ranks-0.375.json ...

The summary CSV OpenCompass writes is parsed, and an accuracy table with the standard error of each
accuracy, sqrt(p (1 - p) / n), is written into docs/benchmarks.md (and docs/data/accuracy.json), with
each row's agreement with the base model's per-item predictions (read from OpenCompass's prediction
files). Before that, `python -m opencompass_ext.bench` times the configs' prefix-sharing inferencer
against OpenCompass's label-by-label PPLInferencer on a few items (same scores, the speed-up).

Every model row scores the same items: the first --items rows (MKV_TEST_RANGE) of each set's fixed
`cpu` subset (hash-selected once, stored in source order; see opencompass_ext/README.md).

  python -m benchmarks.accuracy                   # full run: 500 items of each of the five sets
  python -m benchmarks.accuracy --items 64 --datasets piqa,obqa     # a smaller run
  python -m benchmarks.accuracy --quick           # CI smoke test: tiny checkpoints, quick suite, temp dir
  python -m benchmarks.accuracy --patch-rates     # add chance / majority rows to the docs table, scoring nothing

Beside the model rows the table shows each set's chance rate and majority-class rate on the same items
(benchmarks/chance.py), and says which sets carry signal on this model: only where the base model is
clearly above both can a compressed row's drop be read as lost ability.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.chance import subset_rates
from benchmarks.plots import accuracy_png
from benchmarks.report import BENCH_MD, DATA, ROOT, header, markdown_table, write_section
from opencompass_ext.models import budget_abbr, format_budget

BIN = Path(sys.executable).parent
ABBR = {"csqa": "csqa-8shot", "piqa": "piqa", "obqa": "obqa", "siqa": "siqa", "boolq": "boolq"}
RATE_ROWS = {"chance": "chance (random option)", "majority": "majority answer"}
SIGNAL_SE = 2.0  # base accuracy this many standard errors above max(chance, majority) counts as signal


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


def rate_rows(rates: dict[str, dict], names: list[str]) -> list[list[str]]:
    """Table rows of the chance and majority-class rates (%), laid out like the model rows."""
    rows = []
    for key, label in RATE_ROWS.items():
        cells = [label]
        for name in names:
            value = f"{100 * rates[name][key]:.1f}"
            cells.append(value + (f" ({rates[name]['majority_answer']})" if key == "majority" else ""))
        cells += [f"{100 * sum(rates[n][key] for n in names) / len(names):.1f}", "-"]
        rows.append(cells)
    return rows


def signal_sets(rates: dict[str, dict], base: dict[str, float | None], counts: dict[str, int]) -> dict[str, bool]:
    """{set: base accuracy >= max(chance, majority) + SIGNAL_SE standard errors}."""
    out = {}
    for name, r in rates.items():
        acc = base.get(name)
        floor = 100 * max(r["chance"], r["majority"])
        out[name] = acc is not None and acc >= floor + SIGNAL_SE * stderr_points(acc, counts[name])
    return out


def reading_note(rates: dict[str, dict], base: dict[str, float | None], counts: dict[str, int],
                 set_abbrs: dict[str, str], patched: str | None = None) -> str:
    """The paragraph under the table: reference rates, which sets carry signal, noise level."""
    signal = signal_sets(rates, base, counts)

    def describe(name: str) -> str:
        floor = 100 * max(rates[name]["chance"], rates[name]["majority"])
        acc = base.get(name)
        return f"{set_abbrs[name]} ({acc:.1f} vs {floor:.1f})" if acc is not None else set_abbrs[name]

    yes = [describe(n) for n in rates if signal[n]]
    no = [describe(n) for n in rates if not signal[n]]
    worst = max(stderr_points(50, c) for c in counts.values())
    text = ("Reference rows, computed from the same items (benchmarks/chance.py): `chance (random option)` = the "
            "expected accuracy of picking one of each item's options at random; `majority answer` = the accuracy "
            "of always giving "
            "the most frequent gold answer (its letter in brackets). A set carries signal on this model when the "
            f"base model is at least {SIGNAL_SE:g} standard errors above both (base vs the higher of the two): ")
    text += (", ".join(yes) if yes else "none") + " do"
    if no:
        text += "; " + ", ".join(no) + (" do not, so on those sets a compressed row's accuracy says little about "
                                       "what compression costs")
    low, high = min(counts.values()), max(counts.values())
    text += (f". With n = {low if low == high else f'{low}-{high}'} items per set the standard error of one "
             f"accuracy is up to {worst:.1f} points; differences between two rows on the same items are less noisy "
             "than that, as their errors are correlated (the agreement column shows how many answers actually "
             "change). At 100 % the PcaLlama rows compute the same function as the base model (orthogonal bases "
             "at full rank), so they must match it up to float round-off.")
    if patched:
        text += (f" The two reference rows and this paragraph were added on {patched} by `python -m benchmarks.accuracy "
                 "--patch-rates`, which reads the scored items and scores no model; the model rows are from the "
                 "run dated above.")
    return text


def patch_rates() -> None:
    """Add the rate rows and reading note to the existing docs table and docs/data/accuracy.json, scoring nothing."""
    result = json.loads((DATA / "accuracy.json").read_text())
    suite, counts = result["meta"]["suite"], result["meta"]["items"]
    names = list(counts)
    # counts[name] = min(set size, --items): the first counts[name] rows are exactly the scored items
    rates = {name: subset_rates([name], suite, counts[name])[name] for name in names}
    base = {r["dataset"]: r["accuracy"] for r in result["rows"] if r["model"] == "base-uncompressed"}
    result["meta"]["rates"] = rates
    result["meta"]["signal"] = signal_sets(rates, base, counts)
    suffix = "" if suite == "full" else f"-{suite}"
    set_abbrs = {n: ABBR[n] + suffix for n in names}
    text = BENCH_MD.read_text()
    section = re.search(r"<!-- accuracy:start -->.*?<!-- accuracy:end -->", text, re.DOTALL)
    if not section:
        raise SystemExit(f"no accuracy section in {BENCH_MD}")
    lines = section.group(0).split("\n")
    labels = tuple(f"| {label} |" for label in RATE_ROWS.values())
    lines = [ln for ln in lines if not ln.startswith(labels)]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("| model |")) + 2  # after the header and ---
    new_rows = ["| " + " | ".join(row) + " |" for row in rate_rows(rates, names)]
    lines[at:at] = new_rows
    note = reading_note(rates, base, counts, set_abbrs, patched=datetime.date.today().isoformat())
    lines = [note if ln.startswith(("Chance level:", "Reference rows,")) else ln for ln in lines]
    BENCH_MD.write_text(text.replace(section.group(0), "\n".join(lines)))
    (DATA / "accuracy.json").write_text(json.dumps(result, indent=1))
    for name in names:
        r = rates[name]
        print(f"{set_abbrs[name]}: n = {r['n']}, chance {100 * r['chance']:.1f}, majority {100 * r['majority']:.1f} "
              f"({r['majority_answer']}), base {base.get(name)}, signal {result['meta']['signal'][name]}")
    print(f"patched the accuracy table in {BENCH_MD} and {DATA / 'accuracy.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pca", default="outputs/demo/pca")
    parser.add_argument("--trained", default="outputs/demo/matryoshka",
                        help="trained PcaLlama checkpoint, or the name of shipped projections (embedded-matryoshka)")
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
    parser.add_argument("--json", default=str(DATA / "accuracy.json"),
                        help="result file (the PNG is written beside it, same stem; default docs/data/accuracy.json)")
    parser.add_argument("--section", default="accuracy", choices=("accuracy", "none"),
                        help="rewrite the 'accuracy' section of docs/benchmarks.md, or 'none': only print the table")
    parser.add_argument("--patch-rates", action="store_true",
                        help="only add the chance / majority rows to docs/benchmarks.md and docs/data/accuracy.json")
    args = parser.parse_args()
    if args.patch_rates:
        patch_rates()
        return

    if args.quick:
        tmp = Path(args.work_dir or tempfile.mkdtemp(prefix="mkv-accuracy-quick-"))
        from opencompass_ext.testing import build_tiny_checkpoints

        llama, pca = build_tiny_checkpoints(str(tmp / "ckpt"))
        args.pca = args.trained = pca
        args.base_model, args.suite, args.items, args.datasets, args.budgets = llama, "quick", 2, "piqa,obqa", "100,50"
        from plugin.budgets.ranks import write_rank_file

        # a mixed per-head table on the tiny model (2 layers, 2 KV heads, head_dim 16) at 50%
        ranks = {"key": [[4, 12], [8, 8]], "value": [[16, 4], [2, 10]]}
        args.rank_files = str(write_rank_file(tmp / "ranks-quick.json", ranks, 16))
        args.speed_items = 2
        work = tmp
    else:
        work = Path(args.work_dir or ROOT / "outputs/bench/accuracy")
    from plugin.storage.loading import SHIPPED

    if args.trained in SHIPPED:  # shipped projections on the embedded model, as a checkpoint OpenCompass can load
        from opencompass_ext.suite import shipped_checkpoint

        args.trained = shipped_checkpoint(args.trained)
    if args.base_model is None:
        from plugin.storage import assets

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
        same = total = 0
        for name in names:
            acc = scores.get(set_abbrs[name])
            se = stderr_points(acc, counts[name]) if acc is not None else None
            record = {"model": model, "dataset": name, "n": counts[name], "accuracy": acc, "stderr": se}
            preds = predictions.get(model, {}).get(set_abbrs[name], [])
            ref = base_preds.get(set_abbrs[name], [])
            compared = min(len(preds), len(ref))
            if compared:
                agreed = sum(a == b for a, b in zip(preds, ref))
                record["agreement"] = 100 * agreed / compared  # % of the set's items answered as the base
                same, total = same + agreed, total + compared
            records.append(record)
            cells.append(f"{acc:.1f} ± {se:.1f}" if acc is not None else "-")
        avg = scores.get("mkv-average")
        cells.append(f"{avg:.1f}" if avg is not None else "-")
        cells.append(f"{100 * same / total:.1f}" if total else "-")
        table_rows.append(cells)
    rates = {name: subset_rates([name], args.suite, counts[name])[name] for name in names}
    base_scores = {r["dataset"]: r["accuracy"] for r in records if r["model"] == "base-uncompressed"}
    table_rows = rate_rows(rates, names) + table_rows
    result = {"meta": {"suite": args.suite, "items": counts, "budgets": args.budgets, "rank_files": rank_budgets,
                       "commands": log, "speed": speed, "rates": rates,
                       "signal": signal_sets(rates, base_scores, counts)}, "rows": records}
    headers = ["model"] + [set_abbrs[n] for n in names] + ["average", "same prediction as base, %"]
    if args.quick:
        (work / "accuracy.json").write_text(json.dumps(result, indent=1))
        accuracy_png(result, work / "accuracy.png")
        print(markdown_table(headers, table_rows))
        print(f"accuracy quick run ok: {work / 'accuracy.json'}")
        return
    out_json = Path(args.json)
    out_json.write_text(json.dumps(result, indent=1))
    accuracy_png(result, out_json.with_suffix(".png"))
    if args.section == "none":
        print(markdown_table(headers, table_rows))
        print(f"wrote {out_json} and {out_json.with_suffix('.png')}")
        return
    cmd = "python -m benchmarks.accuracy"
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
    body += markdown_table(headers, table_rows) + "\n\n![accuracy by model row](data/accuracy.png)\n\n"
    body += reading_note(rates, base_scores, counts, set_abbrs) + "\n\n"
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
