"""Short runs that chose the settings of scripts/matryoshka_recipe.yaml (the table of docs/recipe.md).

Each variant is a real `llamafactory-cli train scripts/matryoshka_recipe.yaml key=value ...` run on
the same PCA checkpoint, for the same number of steps and tokens; only the overrides listed below
differ from the recipe.  Quality is the recipe's own held-out curve (`heldout_ppl_<budget>`, the
first --tokens tokens of the evaluation split, 512-token windows), read from trainer_state.json
before the first step (the PCA start, the same for every variant) and after the last.

    python -m benchmarks.recipe_sweep                      # all variants, docs/data/recipe_sweep.json
    python -m benchmarks.recipe_sweep --only recipe,kl0.25 # some of them
    python -m benchmarks.recipe_sweep --only recipe,draws2,recipe20 --variants-out docs/data/recipe_draws.json
    python -m benchmarks.recipe_sweep --steps 2 --variants-out /tmp/x.json --pca <tiny>  # smoke

Finished variants are reused (delete outputs/recipe_sweep/<name> to rerun one): the sweep can be
interrupted and restarted.  Run it alone: two torch processes on 2 cores distort each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.report import DATA, machine, versions

RECIPE = ROOT / "scripts" / "matryoshka_recipe.yaml"

# name -> (what it tests, overrides of the recipe)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "recipe": ("the recipe as shipped (projection lr 1e-2, alpha 1, weighted ranks 8-56, speeches + self-chat)", {}),
    "lr5e-3": ("projection lr 5e-3", {"matryoshka_projection_lr": "5.0e-3"}),
    "lr2e-2": ("projection lr 2e-2", {"matryoshka_projection_lr": "2.0e-2"}),
    "kl0.25": ("lr 5e-3, alpha 0.25 (0.25 KL + 0.75 CE)", {"matryoshka_projection_lr": "5.0e-3",
                                                           "matryoshka_alpha": "0.25"}),
    "uniform": ("lr 5e-3, uniform ranks {8, ..., 64}", {"matryoshka_projection_lr": "5.0e-3",
                                                         "matryoshka_rank_choices": "8,16,24,32,40,48,56,64",
                                                         "matryoshka_rank_probs": "1,1,1,1,1,1,1,1"}),
    "speeches": ("speeches only (no self-chat)", {"dataset": "sotu_train", "mix_strategy": "concat",
                                                   "interleave_probs": "null"}),
    # Two draws per micro-batch share one teacher forward: more student work per step at a lower teacher share.
    # recipe20 gives the one-draw recipe about the same wall time as draws2 (5 vs 3 forward-equivalents a step).
    "draws2": ("two rank draws per micro-batch, one teacher forward", {"matryoshka_rank_samples": "2"}),
    "recipe20": ("the recipe for 20 steps (about the time of draws2's 12)", {"max_steps": "20"}),
    "lora": ("projections + LoRA r=8 on q,k,v,o (lr 2e-4)", {"finetuning_type": "lora",
                                                             "lora_target": "q_proj,k_proj,v_proj,o_proj",
                                                             "lora_rank": "8", "learning_rate": "2.0e-4"}),
}


def _run(name: str, overrides: dict[str, str], args: argparse.Namespace) -> dict:
    out = Path(args.out_dir) / name
    state_file = out / "trainer_state.json"
    if not state_file.is_file():
        shutil.rmtree(out, ignore_errors=True)
        settings = {
            "model_name_or_path": args.pca, "output_dir": str(out), "max_steps": str(args.steps),
            "eval_steps": str(args.steps), "save_steps": "100000", "overwrite_output_dir": "true",
            "warmup_steps": str(max(1, args.steps // 10)), "logging_steps": "1", "plot_loss": "false",
            "matryoshka_heldout_tokens": str(args.tokens), "matryoshka_heldout_budgets": args.budgets,
            "gradient_accumulation_steps": str(args.accumulation), **overrides,
        }
        command = [str(Path(sys.executable).parent / "llamafactory-cli"), "train", str(RECIPE)]
        command += [f"{key}={value}" for key, value in settings.items()]
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   DISABLE_VERSION_CHECK="1")
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, check=False)
        if proc.returncode != 0 or not state_file.is_file():
            raise SystemExit(f"[{name}] failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        (out / "sweep_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    history = json.loads(state_file.read_text())["log_history"]
    curve = [row for row in history if any(key.startswith("heldout_ppl_") for key in row)]
    first, last = curve[0], curve[-1]
    losses = [row["loss"] for row in history if "loss" in row]
    budgets = sorted({key[len("heldout_ppl_"):] for key in last if key.startswith("heldout_ppl_")},
                     key=float, reverse=True)
    return {
        "variant": name, "what": VARIANTS[name][0] if name in VARIANTS else name, "overrides": overrides,
        "steps": last["step"], "start": {b: first[f"heldout_ppl_{b}"] for b in budgets},
        "end": {b: last[f"heldout_ppl_{b}"] for b in budgets}, "last_losses": losses[-5:],
        "seconds": float((out / "sweep_seconds.txt").read_text()) if (out / "sweep_seconds.txt").is_file() else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--pca", default="outputs/demo/pca", help="PCA checkpoint (mkv calibrate; default outputs/demo/pca)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per variant (default 12)")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="gradient_accumulation_steps (default 1: 2 sequences of 512 tokens per step)")
    parser.add_argument("--budgets", default="0.5,0.375", help="held-out budgets (default 0.5,0.375)")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--out-dir", default="outputs/recipe_sweep", help="run directories (default outputs/recipe_sweep)")
    parser.add_argument("--variants-out", default=str(DATA / "recipe_sweep.json"),
                        help="JSON written (default docs/data/recipe_sweep.json)")
    args = parser.parse_args(argv)
    if not (Path(args.pca) / "config.json").is_file():
        parser.error(f"--pca {args.pca!r} is not a checkpoint; run `mkv calibrate --out {args.pca}` first")
    names = list(VARIANTS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    rows = []
    for name in names:
        rows.append(_run(name, VARIANTS[name][1], args))
        result = {"command": "python -m benchmarks.recipe_sweep " + " ".join(argv or sys.argv[1:]),
                  "machine": machine(), "versions": versions(), "date": time.strftime("%Y-%m-%d"),
                  "steps": args.steps, "accumulation": args.accumulation, "heldout_tokens": args.tokens, "rows": rows}
        Path(args.variants_out).write_text(json.dumps(result, indent=2) + "\n")
        end = rows[-1]["end"]
        print(f"[{name}] " + ", ".join(f"{b}: {rows[-1]['start'][b]:.2f} -> {end[b]:.2f}" for b in end), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
