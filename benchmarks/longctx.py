"""Long context across budgets: pass-key retrieval by depth, and the perplexity of the last 512 tokens.

* retrieval (plugin.retrieval): prompts of --contexts tokens of held-out text with a pass key at each
  --depths, answered by greedy generation (8 tokens); accuracy per (model, budget, context, depth).
  Run the full model first (budget 1) to see where the 135M model itself succeeds.
* perplexity of the last 512 tokens of --ppl-contexts-token windows of held-out text (the context
  before them is cached at the same budget).

    python benchmarks/longctx.py --model embedded-matryoshka --label recipe --contexts 512,1024,2048 \\
        --ppl-contexts 2048,4096 --budgets 1,0.5,0.25          # docs/longctx.json
    python benchmarks/longctx.py --model <tiny> --contexts 128 --ppl-contexts 1024 --per-depth 1 --out /tmp/l
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, versions, write_json


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def last_tokens_nll(model, ids, tail: int = 512) -> tuple[float, int]:
    """Summed NLL of the last `tail` tokens of each row of `ids`, given everything before them."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, -tail - 1 : -1].float()
    target = ids[:, -tail:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), target.numel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", required=True, help="PcaLlama dir or artifact (repeatable)")
    parser.add_argument("--label", action="append", default=None)
    parser.add_argument("--budgets", default="1,0.75,0.5,0.25")
    parser.add_argument("--contexts", default="512,1024,2048", help="retrieval prompt lengths (tokens)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--per-depth", type=int, default=4)
    parser.add_argument("--ppl-contexts", default="2048,4096", help="window lengths for last-512-token perplexity")
    parser.add_argument("--ppl-windows", type=int, default=2, help="windows per length (default 2)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "longctx.json"))
    args = parser.parse_args(argv)
    labels = args.label or [Path(m).name for m in args.model]
    if len(labels) != len(args.model):
        parser.error("give one --label per --model, or none")

    import torch

    from plugin.data import load_texts, token_windows
    from plugin.loading import load_model
    from plugin.retrieval import is_correct, passkey_items

    texts = load_texts(None, split="evaluation")
    retrieval, perplexity = [], []
    for spec, label in zip(args.model, labels):
        model, tokenizer = load_model(spec)
        prompts = {c: passkey_items(tokenizer, texts, c, _floats(args.depths), args.per_depth) for c in _ints(args.contexts)}
        windows = {c: token_windows(tokenizer, texts, c, c * args.ppl_windows) for c in _ints(args.ppl_contexts)}
        for budget in _floats(args.budgets):
            model.set_kv_budget(budget)
            for context, items in prompts.items():
                start = time.perf_counter()
                correct: dict[float, list[bool]] = {}
                for item in items:
                    ids = tokenizer(item.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                    correct.setdefault(item.depth, []).append(is_correct(answer, item.key))
                for depth, hits in correct.items():
                    retrieval.append({"model": label, "budget": budget, "context": context, "depth": depth,
                                      "accuracy": sum(hits) / len(hits), "items": len(hits)})
                print(f"{label} @ {budget:g}, {context} tokens: "
                      + ", ".join(f"depth {d:g}: {sum(h)}/{len(h)}" for d, h in correct.items())
                      + f" ({time.perf_counter() - start:.0f} s)", flush=True)
            for context, rows in windows.items():
                nll, count = 0.0, 0
                for row in rows:
                    a, b = last_tokens_nll(model, row[None])
                    nll, count = nll + a, count + b
                perplexity.append({"model": label, "budget": budget, "context": context,
                                   "last512_perplexity": math.exp(nll / count), "windows": int(rows.shape[0])})
                print(f"{label} @ {budget:g}: last-512 perplexity at {context} = {math.exp(nll / count):.2f}", flush=True)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    result = {"command": "python benchmarks/longctx.py " + " ".join(argv or sys.argv[1:]), "machine": machine(),
              "versions": versions(), "date": time.strftime("%Y-%m-%d"), "retrieval": retrieval,
              "perplexity": perplexity}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
