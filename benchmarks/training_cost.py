"""Training cost of Matryoshka distillation: seconds per optimizer step and peak memory vs plain Matryoshka training.

The headline compares the two Matryoshka trainers on the same workload (the same trainable projection
parameters, the same batches and tokens): `distill` adds a no-grad full-rank teacher forward and a KL term
to what `plain` does. LLaMA-Factory's stock trainer trains other parameters (q/k/v/o or every weight), so
its rows are context, not a like-for-like comparison.

Each variant is one real `llamafactory-cli train scripts/matryoshka_pt.yaml key=value ...` run on the
same PCA checkpoint, data and YAML (only the overrides below differ), one after the other in the same
invocation of this script, so the ratios compare runs on the same machine state:

  distill       matryoshka_trainer=distill  (the default: KL to the full-rank teacher + CE; projections train)
  plain         matryoshka_trainer=plain    (CE under sampled ranks, no teacher forward; projections train)
  distill-2draws / plain-2draws   the same with matryoshka_rank_samples=2: every micro-batch is trained under
                two rank draws; distill runs its teacher once per micro-batch for both
  stock-freeze  matryoshka_trainer=none finetuning_type=freeze freeze_trainable_layers=<all>
                freeze_trainable_modules=self_attn   (context: LLaMA-Factory's CustomTrainer training q/k/v/o
                + the projections, a different and larger set of parameters)
  stock-full    matryoshka_trainer=none finetuning_type=full  (context: LLaMA-Factory's CustomTrainer training
                ALL weights)

Common overrides: max_steps=N, eval_strategy=no, save_strategy=no, plot_loss=false, output_dir=<temp>.
Time per step = (elapsed at the last step - elapsed at step 1) / (N - 1) from trainer_log.jsonl (the first
step carries warm-up), with train_runtime / N alongside. Every row's ratio is its s/step divided by the
s/step of the plain run with the same number of draws (`plain` for the stock rows). Peak memory = max RSS of the llamafactory-cli process tree
(getrusage(RUSAGE_CHILDREN) in a fresh wrapper process per run).

  python -m benchmarks.training_cost                 # full run on outputs/demo/pca, docs/benchmarks.md section
  python -m benchmarks.training_cost --quick         # CI: the Matryoshka rows on a tiny checkpoint, temp dir, no docs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.plots import training_cost_png
from benchmarks.report import DATA, ROOT, header, markdown_table, write_section

BIN = Path(sys.executable).parent
VARIANTS = {
    "distill": {"matryoshka_trainer": "distill"},
    "plain": {"matryoshka_trainer": "plain"},
    "distill-2draws": {"matryoshka_trainer": "distill", "matryoshka_rank_samples": "2"},
    "plain-2draws": {"matryoshka_trainer": "plain", "matryoshka_rank_samples": "2"},
    "stock-freeze": {"matryoshka_trainer": "none", "finetuning_type": "freeze",
                     "freeze_trainable_layers": "{layers}", "freeze_trainable_modules": "self_attn"},
    "stock-full": {"matryoshka_trainer": "none", "finetuning_type": "full"},
}
# Each row is compared with plain Matryoshka training doing the same student work (rank draws per micro-batch);
# the stock rows with `plain`.
REFERENCE = {"distill": "plain", "distill-2draws": "plain-2draws", "plain-2draws": "plain-2draws"}
DEFAULT_REFERENCE = "plain"
HEADLINE = ("distill", "plain", "distill-2draws", "plain-2draws")
WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print('MKV_RUSAGE ' + json.dumps({'rc': rc, 'wall_s': time.perf_counter() - t, "
    "'max_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def rel(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def per_step_seconds(out_dir: Path, steps: int) -> tuple[float | None, float | None]:
    """(steady-state s/step from trainer_log.jsonl, train_runtime / steps)."""
    runtime = None
    results = out_dir / "train_results.json"
    if results.is_file():
        runtime = json.loads(results.read_text()).get("train_runtime")
    elapsed = {}
    log = out_dir / "trainer_log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if "elapsed_time" in entry and "current_steps" in entry and "loss" in entry:
                h, m, s = (int(x) for x in entry["elapsed_time"].split(":"))
                elapsed[entry["current_steps"]] = 3600 * h + 60 * m + s
    steady = None
    if len(elapsed) >= 2:
        first, last = min(elapsed), max(elapsed)
        steady = (elapsed[last] - elapsed[first]) / (last - first)
    return steady, (runtime / steps if runtime else None)


def trainable_line(text: str) -> str:
    """'2,112 of 88,320' from LLaMA-Factory's 'trainable params: X || all params: Y || ...' log line."""
    for line in text.splitlines():
        if "trainable params:" in line and "all params:" in line:
            trainable = line.split("trainable params:", 1)[1].split("||")[0].strip()
            total = line.split("all params:", 1)[1].split("||")[0].strip()
            return f"{trainable} of {total}"
    return ""


def run_variant(name: str, overrides: dict[str, str], base: dict[str, str], yaml: str, work: Path,
                env: dict[str, str]) -> dict:
    out_dir = work / name
    shutil.rmtree(out_dir, ignore_errors=True)
    args = {**base, **overrides, "output_dir": str(out_dir)}
    cli = [str(BIN / "llamafactory-cli"), "train", yaml] + [f"{k}={v}" for k, v in args.items()]
    shown = "llamafactory-cli train " + yaml + " " + " ".join(
        f"{k}={shlex.quote(rel(v) if str(v).startswith('/') else str(v))}" for k, v in args.items())
    print(f"$ {shown}", flush=True)
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cli], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True)
    usage_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MKV_RUSAGE ")]
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    usage = json.loads(usage_lines[-1].split(" ", 1)[1]) if usage_lines else {"rc": proc.returncode}
    if usage.get("rc") != 0:
        print((proc.stdout + proc.stderr)[-4000:])
        raise SystemExit(f"{name}: llamafactory-cli failed (exit {usage.get('rc')}); log {work / f'{name}.log'}")
    steps = int(args["max_steps"])
    steady, mean = per_step_seconds(out_dir, steps)
    # The trainer log has 1-second timestamps: sub-second steps (tiny models) give a 0 s span, not a 0 s step.
    steady = steady or mean
    row = {"variant": name, "command": shown, "steps": steps, "s_per_step": steady, "runtime_per_step": mean,
           "wall_s": usage["wall_s"], "peak_rss_mib": usage["max_rss_kib"] / 1024,
           "trainable": trainable_line(proc.stdout + proc.stderr)}
    print(f"  {name}: {steady} s/step (steady), {mean} s/step (train_runtime/steps), "
          f"peak RSS {row['peak_rss_mib']:.0f} MiB, wall {usage['wall_s']:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo/pca", help="PCA-calibrated PcaLlama checkpoint")
    parser.add_argument("--yaml", default="scripts/matryoshka_pt.yaml")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--work-dir", default=None, help="run outputs (default: a temp dir, removed at the end)")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny checkpoint and dataset, no docs")
    args = parser.parse_args()

    keep = args.work_dir is not None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mkv-training-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    base = {"model_name_or_path": args.model, "max_steps": str(args.steps), "eval_strategy": "\"no\"",
            "save_strategy": "\"no\"", "plot_loss": "false", "logging_steps": "1"}
    if args.quick:
        from llamafactory_ext.testing import build_tiny_pcallama, write_tiny_datasets

        model = build_tiny_pcallama(work / "model")
        data = write_tiny_datasets(work / "data")
        base.update(model_name_or_path=str(model), dataset="tiny_pt", dataset_dir=str(data), cutoff_len="32",
                    max_samples="48", val_size="0", max_steps="3")
        if args.variants == ",".join(VARIANTS):
            args.variants = ",".join(HEADLINE)  # the stock rows are context only
    config = json.loads((Path(base["model_name_or_path"]) / "config.json").read_text())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DISABLE_VERSION_CHECK="1",
               WANDB_DISABLED="true", LLAMAFACTORY_VERBOSITY="INFO")
    for key in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "ALLOW_EXTRA_ARGS", "MKV_DISABLE_LLAMAFACTORY_HOOK"):
        env.pop(key, None)

    rows = []
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        overrides = {k: v.format(layers=config["num_hidden_layers"]) for k, v in VARIANTS[name].items()}
        rows.append(run_variant(name, overrides, base, args.yaml, work, env))
    # The reference is plain Matryoshka training: same trainable parameters, tokens and rank draws as distill.
    by_name = {r["variant"]: r for r in rows}
    for row in rows:
        ref = by_name.get(REFERENCE.get(row["variant"], DEFAULT_REFERENCE))
        row["reference"] = ref["variant"] if ref else None
        row["ratio_to_plain"] = (row["s_per_step"] / ref["s_per_step"]) if ref and row["s_per_step"] and ref[
            "s_per_step"] else None
    result = {"meta": {"model": rel(base["model_name_or_path"]), "yaml": args.yaml, "steps": int(base["max_steps"])},
              "rows": rows}
    if args.quick:
        (work / "training_cost.json").write_text(json.dumps(result, indent=1))
        training_cost_png(result, work / "training_cost.png")
        print(f"training_cost quick run ok: {work / 'training_cost.json'} {work / 'training_cost.png'}")
        return
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    (DATA / "training_cost.json").write_text(json.dumps(result, indent=1))
    training_cost_png(result, DATA / "training_cost.png")
    write_section("training_cost", "Training cost (LLaMA-Factory)", render(rows, base, args))
    print(f"wrote {DATA / 'training_cost.json'}, training_cost.png and the 'training_cost' section of docs/benchmarks.md")


def render(rows: list[dict], base: dict[str, str], args: argparse.Namespace) -> str:
    def num(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    def table(selected: list[dict]) -> str:
        cells = [[r["variant"], num(r["s_per_step"], ".1f"), num(r["runtime_per_step"], ".1f"),
                  num(r["ratio_to_plain"], ".2f") + (f" ({r['reference']})" if r.get("reference") else ""),
                  f"{r['peak_rss_mib']:.0f}", r["trainable"] or "-"]
                 for r in selected]
        return markdown_table(["variant", "s / step (steady)", "train_runtime / steps", "s/step vs plain",
                               "peak RSS MiB", "trainable parameters (LLaMA-Factory's log)"], cells)

    by_name = {r["variant"]: r for r in rows}
    headline = [by_name[n] for n in HEADLINE if n in by_name]
    context = [r for r in rows if r["variant"] not in HEADLINE]
    body = header("python -m benchmarks.training_cost") + "\n"
    for teacher in ("distill", "distill-2draws"):
        distill, plain = by_name.get(teacher), by_name.get(REFERENCE[teacher])
        if not (distill and plain and distill["s_per_step"] and plain["s_per_step"]):
            continue
        same = distill["trainable"] == plain["trainable"]
        draws = "one rank draw" if teacher == "distill" else "two rank draws (`matryoshka_rank_samples: 2`)"
        body += (f"**With {draws} per micro-batch, distillation costs {distill['ratio_to_plain']:.2f}x plain "
                 f"Matryoshka training per optimizer step** ({distill['s_per_step']:.1f} vs "
                 f"{plain['s_per_step']:.1f} s/step; peak RSS {distill['peak_rss_mib']:.0f} vs "
                 f"{plain['peak_rss_mib']:.0f} MiB), "
                 + ("with the same trainable parameters" if same else "**with different trainable parameters**")
                 + f" ({distill['trainable'] or '-'}) and the same batches, tokens and draws: the difference is the "
                 "no-grad full-rank teacher forward (once per micro-batch, whatever the draws) and the KL "
                 "term.\n\n")
    body += (f"`llamafactory-cli train {args.yaml}` on `{rel(base['model_name_or_path'])}` (SmolLM2-135M, PCA bases), "
             f"{base['max_steps']} optimizer steps per variant (batch 2 x gradient accumulation 2 = 4 sequences of "
             "256 tokens per step, float32, CPU, no gradient checkpointing), one variant after the other in one "
             "run. s/step = steady state from trainer_log.jsonl (elapsed from step 1 to the last step); "
             "peak RSS = max resident set of the llamafactory-cli process tree; every ratio is against the s/step "
             "of the plain run with the same rank draws per micro-batch (in brackets). With two draws each "
             "optimizer step trains every micro-batch twice, under two independent rank draws, so the -2draws rows "
             "do twice the student work of the one-draw rows; what the second draw buys in quality is measured in "
             "docs/recipe.md.\n\n")
    body += table(headline) + "\n\n"
    if context:
        body += ("Context only, a different workload: LLaMA-Factory's own trainer (`matryoshka_trainer: none`) on "
                 "the same checkpoint, data and steps. `stock-freeze` (`finetuning_type: freeze` over all layers' "
                 "`self_attn` modules) computes weight gradients and AdamW updates for q/k/v/o as well as the "
                 "projections (which sit in `self_attn`); `stock-full` trains every weight (gradients and AdamW "
                 "state for all parameters). Neither samples ranks: they run the PcaLlama checkpoint at its saved "
                 "(full) ranks. Their time is not the price of the Matryoshka method.\n\n")
        body += table(context) + "\n\n"
    body += "![training cost](data/training_cost.png)\n\n"
    body += ("The machine is shared (2 cores); ratios within this one run are more reliable than the absolute "
             "seconds.\n\nCommands:\n\n```bash\n")
    body += "".join(f"{r['command']}   # {r['wall_s']:.0f} s wall\n" for r in rows) + "```\n"
    return body


if __name__ == "__main__":
    main()
