"""The recipe's learning curve: held-out perplexity at each budget against training tokens.

Reads the `heldout_ppl_<budget>` rows that the Matryoshka trainer logs (scripts/matryoshka_recipe.yaml
sets `matryoshka_heldout_budgets`) from the run's trainer_state.json, and writes a PNG and a JSON.
Training tokens = step x per-device batch (trainer_state.json) x --accumulation x --cutoff-len
(one process): pre-training packs text into full cutoff_len blocks.

    python -m benchmarks.recipe_curve                                  # outputs/recipe/train -> docs/
    python -m benchmarks.recipe_curve --run outputs/recipe/train/checkpoint-40 --out /tmp/curve
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.report import DATA

ROOT = Path(__file__).resolve().parents[1]


def curve(run: Path, accumulation: int) -> tuple[list[dict], int]:
    """(held-out rows, sequences per optimizer step); the per-device batch is read from trainer_state.json."""
    state = json.loads((run / "trainer_state.json").read_text())
    sequences_per_step = int(state.get("train_batch_size") or 1) * accumulation
    rows, seen = [], set()
    for row in state["log_history"]:
        if any(key.startswith("heldout_ppl_") for key in row) and row["step"] not in seen:
            seen.add(row["step"])
            rows.append({"step": row["step"], **{k[len("heldout_ppl_"):]: v for k, v in row.items()
                                                  if k.startswith("heldout_ppl_")}})
    return rows, sequences_per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", default="outputs/recipe/train", help="output_dir (or checkpoint) of the recipe run")
    parser.add_argument("--cutoff-len", type=int, default=512, help="cutoff_len of the run (default 512)")
    parser.add_argument("--accumulation", type=int, default=2,
                        help="gradient_accumulation_steps of the run (default 2, the recipe's)")
    parser.add_argument("--full", type=float, default=None, help="full-cache perplexity, drawn as a line")
    parser.add_argument("--out", default=str(DATA / "recipe_curve"), help="writes OUT.png and OUT.json")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "trainer_state.json").is_file():
        parser.error(f"{run} has no trainer_state.json; run `make recipe` (or give a checkpoint-* directory)")
    rows, sequences_per_step = curve(run, args.accumulation)
    if not rows:
        parser.error(f"{run} logged no held-out perplexity (set matryoshka_heldout_budgets in the YAML)")
    for row in rows:
        row["tokens"] = row["step"] * sequences_per_step * args.cutoff_len

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted((k for k in rows[0] if k not in ("step", "tokens")), key=float, reverse=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for budget in budgets:
        ax.plot([r["tokens"] for r in rows], [r[budget] for r in rows], marker="o", label=f"{float(budget):.1%} budget")
    if args.full:
        ax.axhline(args.full, color="black", linestyle="--", label=f"full cache ({args.full:.2f})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    ax.set_title("Matryoshka recipe: held-out perplexity during training")
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=120)
    Path(f"{args.out}.json").write_text(json.dumps({"run": str(run), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}.png, {args.out}.json")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
