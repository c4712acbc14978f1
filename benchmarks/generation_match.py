"""Do compressed-cache answers say what the full cache says?  Greedy chat answers across budgets.

For each held-out instruction of plugin.evaluation.instructions (never used for calibration or training),
the model answers in its chat template (greedy, --new-tokens tokens) with the full cache and at
each budget.  Two rules, both without a judge model:

* strict: the first sentence equals the full-cache answer's first sentence (plugin.evaluation.chat.same_first_sentence);
* similar: word-level ROUGE-L with the full-cache answer at or above a threshold calibrated on the full
  model itself (plugin.evaluation.answer_match): its greedy answers against --samples sampled answers of its own
  (temperature 0.7; same meaning) and against its answer to the next instruction (another meaning),
  the cut that best separates them.

The full-cache answers come from the first model at budget 1 (every PcaLlama at full rank is the base
model).

    python -m benchmarks.generation_match --model outputs/demo/pca --model outputs/recipe/train \\
        --label pca --label recipe                       # docs/data/generation_match.json
    python -m benchmarks.generation_match --model <tiny> --prompts 4 --out /tmp/g.json   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.report import DATA, machine, versions, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", required=True, help="PcaLlama checkpoint (repeatable)")
    parser.add_argument("--label", action="append", default=None, help="name per --model")
    parser.add_argument("--budgets", default="0.75,0.5,0.375", help="budgets (default 0.75,0.5,0.375)")
    parser.add_argument("--prompts", type=int, default=None, help="first N held-out instructions (default all)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per answer (default 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--examples", type=int, default=6, help="examples kept per row (default 6)")
    parser.add_argument("--samples", type=int, default=3,
                        help="sampled full-cache answers per instruction that calibrate the similarity rule (default 3)")
    parser.add_argument("--out", default=str(DATA / "generation_match.json"))
    args = parser.parse_args(argv)
    labels = args.label or [Path(m).name for m in args.model]
    if len(labels) != len(args.model):
        parser.error("give one --label per --model, or none")
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]

    from plugin.evaluation.answer_match import calibrate_threshold, calibration_pairs, rouge_l
    from plugin.evaluation.chat import first_sentence, generate_answers, same_first_sentence
    from plugin.evaluation.instructions import instructions
    from plugin.storage.loading import load_model

    prompts = instructions("heldout")[: args.prompts]
    rows, reference, threshold, calibration = [], None, None, {}
    for spec, label in zip(args.model, labels):
        model, tokenizer = load_model(spec)
        if reference is None:
            model.set_kv_budget(1.0)
            start = time.perf_counter()
            reference = generate_answers(model, tokenizer, prompts, args.new_tokens, args.batch_size, desc="full")
            rows.append({"model": label, "budget": 1.0, "matches": len(prompts), "similar": len(prompts),
                         "prompts": len(prompts), "rate": 1.0, "seconds": time.perf_counter() - start,
                         "examples": []})
            drawn = [generate_answers(model, tokenizer, prompts, args.new_tokens, args.batch_size, do_sample=True,
                                      seed=seed, desc=f"full, sample {seed + 1}") for seed in range(args.samples)]
            positives, negatives = calibration_pairs(reference, list(zip(*drawn)))
            threshold = calibrate_threshold(positives, negatives)
            calibration = {"threshold": threshold.value, "true_positive_rate": threshold.true_positive_rate,
                           "false_positive_rate": threshold.false_positive_rate, "positives": positives,
                           "negatives": negatives, "samples_per_prompt": args.samples}
            print(f"similarity rule: ROUGE-L >= {threshold.value:.3f} (own resamples {threshold.true_positive_rate:.0%} "
                  f"pass, answers to other instructions {threshold.false_positive_rate:.0%})", flush=True)
        for budget in budgets:
            model.set_kv_budget(budget)
            start = time.perf_counter()
            answers = generate_answers(model, tokenizer, prompts, args.new_tokens, args.batch_size,
                                       desc=f"{label} @ {budget:g}")
            same = [same_first_sentence(ref, ans) for ref, ans in zip(reference, answers)]
            scores = [rouge_l(ref, ans) for ref, ans in zip(reference, answers)]
            similar = [score >= threshold.value for score in scores]
            examples = [{"prompt": p, "full": first_sentence(r), "compressed": first_sentence(a), "match": m,
                         "rouge_l": round(score, 3), "similar": sim}
                        for p, r, a, m, score, sim in zip(prompts, reference, answers, same, scores, similar)]
            rows.append({"model": label, "budget": budget, "matches": sum(same), "similar": sum(similar),
                         "prompts": len(prompts), "rate": sum(same) / len(prompts),
                         "similar_rate": sum(similar) / len(prompts), "mean_rouge_l": sum(scores) / len(scores),
                         "seconds": time.perf_counter() - start, "examples": examples[: args.examples],
                         "answers": answers})  # all of them, for other matching rules
            print(f"{label} @ {budget:g}: {sum(same)}/{len(prompts)} first sentences equal, "
                  f"{sum(similar)}/{len(prompts)} similar", flush=True)
        del model
    result = {"command": "python -m benchmarks.generation_match " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "versions": versions(), "date": time.strftime("%Y-%m-%d"),
              "rule": "first sentence (up to . ! ? or newline) identical to the full-cache answer's",
              "similarity_rule": "word-level ROUGE-L F1 with the full-cache answer >= the calibrated threshold",
              "calibration": calibration,
              "new_tokens": args.new_tokens, "full_answers": dict(zip(prompts, reference)), "rows": rows}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
