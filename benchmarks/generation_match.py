"""Do compressed-cache answers say what the full cache says?  Greedy chat answers across budgets.

For each held-out instruction of plugin.instructions (never used for calibration or training),
the model answers in its chat template (greedy, --new-tokens tokens) with the full cache and at
each budget; an answer "matches" when its first sentence equals the full-cache answer's first
sentence (plugin.chat.same_first_sentence: strict, reproducible, no judge model).  The full-cache
answers come from the first model at budget 1 (every PcaLlama at full rank is the base model).

    python benchmarks/generation_match.py --model outputs/demo/pca --model outputs/recipe/train \\
        --label pca --label recipe                       # docs/generation_match.json
    python benchmarks/generation_match.py --model <tiny> --prompts 4 --out /tmp/g.json   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, versions, write_json


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
    parser.add_argument("--out", default=str(ROOT / "docs" / "generation_match.json"))
    args = parser.parse_args(argv)
    labels = args.label or [Path(m).name for m in args.model]
    if len(labels) != len(args.model):
        parser.error("give one --label per --model, or none")
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]

    from plugin.chat import first_sentence, generate_answers, same_first_sentence
    from plugin.instructions import instructions
    from plugin.loading import load_model

    prompts = instructions("heldout")[: args.prompts]
    rows, reference = [], None
    for spec, label in zip(args.model, labels):
        model, tokenizer = load_model(spec)
        if reference is None:
            model.set_kv_budget(1.0)
            start = time.perf_counter()
            reference = generate_answers(model, tokenizer, prompts, args.new_tokens, args.batch_size, desc="full")
            rows.append({"model": label, "budget": 1.0, "matches": len(prompts), "prompts": len(prompts),
                         "rate": 1.0, "seconds": time.perf_counter() - start, "examples": []})
        for budget in budgets:
            model.set_kv_budget(budget)
            start = time.perf_counter()
            answers = generate_answers(model, tokenizer, prompts, args.new_tokens, args.batch_size,
                                       desc=f"{label} @ {budget:g}")
            same = [same_first_sentence(ref, ans) for ref, ans in zip(reference, answers)]
            examples = [{"prompt": p, "full": first_sentence(r), "compressed": first_sentence(a), "match": m}
                        for p, r, a, m in zip(prompts, reference, answers, same)][: args.examples]
            rows.append({"model": label, "budget": budget, "matches": sum(same), "prompts": len(prompts),
                         "rate": sum(same) / len(prompts), "seconds": time.perf_counter() - start,
                         "examples": examples, "answers": answers})  # all of them, for other matching rules
            print(f"{label} @ {budget:g}: {sum(same)}/{len(prompts)} first sentences equal", flush=True)
        del model
    result = {"command": "python benchmarks/generation_match.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "versions": versions(), "date": time.strftime("%Y-%m-%d"),
              "rule": "first sentence (up to . ! ? or newline) identical to the full-cache answer's",
              "new_tokens": args.new_tokens, "full_answers": dict(zip(prompts, reference)), "rows": rows}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
