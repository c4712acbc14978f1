"""Where the key basis sits relative to RoPE: the same budget, keys projected after RoPE vs before it.

For each --model (LABEL=PATH[@BUDGETS]: PcaLlama checkpoints or projection artifacts, e.g. a pre-RoPE and a
post-RoPE calibration of the same base on the same tokens) at each of its budgets (default --budgets), in
one process, on the same tokens:

* whole 512-token windows (--short-tokens held-out tokens): perplexity, its ratio to the full cache and
  the paired bootstrap 95% interval over 64-token blocks;
* the last 512 tokens of --contexts windows (--windows per length) read through the cache after the rest:
  the same, per length;
* every pair of models at the same budget: the paired interval of their ratio (the first over the second);
* decode speed at --decode-context tokens: a prefill, then --decode-steps greedy steps timed, tokens/s, for
  the full cache and each model at its first budget, one after the other in one process (the machine is shared: ratios
  are read within a run).

    python -m benchmarks.key_space --model pre=outputs/longctx/pca-pre-rope --model post=outputs/longctx/pca-post-rope \\
        --budgets 0.5,0.25 --contexts 2048,4096,8192 --windows 8,8,4 --docs
    python -m benchmarks.key_space --model a=<tiny> --budgets 0.5 --contexts 96 --windows 2 --short-tokens 256 \\
        --score-last 32 --decode-context 64 --decode-steps 2 --out /tmp/k.json      # a quick check
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.report import DATA, header, markdown_table, write_json, write_section


def _parse(args: argparse.Namespace) -> tuple[list[tuple[str, str, list[float] | None]], list[float], list[tuple[int, int]]]:
    from plugin.budgets.ranks import parse_budgets
    from plugin.commands.calibrate import parse_lengths

    models = []
    for text in args.model:
        label, _, path = text.partition("=")
        path, _, own = path.partition("@")
        if not path:
            raise SystemExit(f"--model {text!r}: give LABEL=PATH or LABEL=PATH@BUDGETS")
        models.append((label, path, parse_budgets(own) if own else None))
    contexts = parse_lengths(args.contexts, "--contexts") if args.contexts else []
    windows = parse_lengths(args.windows, "--windows") if args.windows else [8] * len(contexts)
    windows = windows * len(contexts) if len(windows) == 1 else windows
    if len(windows) != len(contexts):
        raise SystemExit("--windows: one count, or one per --contexts length")
    return models, parse_budgets(args.budgets), list(zip(contexts, windows))


def decode_speed(model: Any, ids: Any, steps: int) -> float:
    """Greedy decode tokens/s after a prefill of ``ids`` [1, T] (the prefill not timed)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
        return steps / (time.perf_counter() - start)


def measure_decode(loaded: list, budgets_of: dict[str, list[float]], args: argparse.Namespace) -> list[dict]:
    """Decode tokens/s after a prefill of --decode-context held-out tokens: the full cache (the first model at full
    rank), then each model at its first budget, one after the other in this process."""
    from plugin.storage.texts import load_texts, token_windows

    ids = token_windows(loaded[0][2], load_texts(None, split="evaluation"), args.decode_context, args.decode_context)[:1]
    settings = [("full cache", loaded[0][1], 1.0)] + [(label, model, budgets_of[label][0]) for label, model, _ in loaded]
    speed = []
    for label, model, budget in settings:
        model.set_kv_budget(budget)
        rate = decode_speed(model, ids, args.decode_steps)
        speed.append({"setting": label, "budget": budget, "key_space": model.config.kv_key_space,
                      "context": args.decode_context, "tokens_per_second": rate})
        print(f"decode {label} {budget:g}: {rate:.2f} tokens/s", flush=True)
    for row in speed:
        row["vs_full"] = row["tokens_per_second"] / speed[0]["tokens_per_second"]
    return speed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", default=[], help="LABEL=PATH (repeatable)")
    parser.add_argument("--budgets", default="0.5,0.25")
    parser.add_argument("--contexts", default="2048,4096,8192")
    parser.add_argument("--windows", default="8,8,4", help="windows per context length")
    parser.add_argument("--score-last", type=int, default=512)
    parser.add_argument("--short-tokens", type=int, default=16384, help="held-out tokens in 512-token windows")
    parser.add_argument("--decode-context", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", default=str(DATA / "key_space.json"))
    parser.add_argument("--docs", action="store_true", help="also write the section of docs/benchmarks.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs section from --out, measuring nothing")
    parser.add_argument("--decode-only", action="store_true",
                        help="measure decode speed again (the models and budgets of --model) and replace --out's decode rows")
    args = parser.parse_args(argv)
    if args.render_only:
        import json

        write_section("key_space", "Key basis before or after RoPE, at equal bytes",
                      render(json.loads(Path(args.out).read_text())))
        return 0
    if not args.model:
        parser.error("give at least one --model LABEL=PATH")
    models, budgets, plan = _parse(args)

    from plugin.evaluation.intervals import paired_ratio
    from plugin.evaluation.perplexity import long_context_nll, window_token_nlls
    from plugin.storage.loading import load_model
    from plugin.storage.texts import load_texts, token_windows

    loaded = [(label, *load_model(path)) for label, path, _ in models]
    budgets_of = {label: own or budgets for label, _, own in models}
    if args.decode_only:
        import json

        result = json.loads(Path(args.out).read_text())
        result["decode"] = measure_decode(loaded, budgets_of, args)
        result["decode_command"] = "python -m benchmarks.key_space " + " ".join(
            argv if argv is not None else __import__("sys").argv[1:])
        write_json(args.out, result)
        if args.docs:
            write_section("key_space", "Key basis before or after RoPE, at equal bytes", render(result))
        return 0
    tokenizer = loaded[0][2]
    texts = load_texts(None, split="evaluation")
    short = token_windows(tokenizer, texts, 512, args.short_tokens)
    long = {n: token_windows(tokenizer, texts, n, n * count) for n, count in plan}
    protocols = {"512 windows": lambda m: window_token_nlls(m, short, 4, desc="512 windows")}
    for n, rows in long.items():
        protocols[f"last {args.score_last} after {n}"] = (
            lambda m, rows=rows, n=n: long_context_nll(m, rows, args.score_last, desc=f"{n} tokens"))

    first = loaded[0][1]
    first.set_kv_budget(1.0)
    reference = {name: score(first) for name, score in protocols.items()}  # the full cache: the base exactly
    results, nlls = [], {}
    for label, model, _ in loaded:
        for budget in budgets_of[label]:
            model.set_kv_budget(budget)
            for name, score in protocols.items():
                start = time.perf_counter()
                nll = score(model)
                nlls[(label, budget, name)] = nll
                results.append({"model": label, "key_space": model.config.kv_key_space, "budget": budget,
                                "protocol": name, "perplexity": math.exp(float(nll.mean())),
                                "full_perplexity": math.exp(float(reference[name].mean())),
                                "vs_full": paired_ratio(nll, reference[name]).as_dict(),
                                "bytes_ratio": model.kv_cache_bytes_per_token() / model.full_cache_bytes_per_token(),
                                "tokens": int(nll.numel()), "seconds": round(time.perf_counter() - start, 1)})
                print(f"{label} {budget:g} {name}: {results[-1]['perplexity']:.2f} "
                      f"({results[-1]['vs_full']['ratio']:.2f}x full)", flush=True)
    pairs = []
    for i, (a, *_rest) in enumerate(loaded):
        for b, *_other in loaded[i + 1:]:
            for budget in sorted(set(budgets_of[a]) & set(budgets_of[b]), reverse=True):
                for name in protocols:
                    interval = paired_ratio(nlls[(a, budget, name)], nlls[(b, budget, name)])
                    pairs.append({"first": a, "second": b, "budget": budget, "protocol": name, **interval.as_dict()})

    speed = measure_decode(loaded, budgets_of, args) if args.decode_steps > 0 else []

    command = "python -m benchmarks.key_space " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    result = {"header": header(command), "models": {label: path for label, path, _ in models}, "windows": {str(n): c for n, c in plan},
              "rows": results, "pairs": pairs, "decode": speed}
    write_json(args.out, result)
    if args.docs:
        write_section("key_space", "Key basis before or after RoPE, at equal bytes", render(result))
    return 0


def render(result: dict) -> str:
    body = result["header"] + "\n"
    body += ("Perplexity and its ratio to the full cache (paired block bootstrap 95% interval over 64-token "
             "blocks; cache bytes as a fraction of the full cache, equal for both key spaces):\n\n")
    table = []
    for row in result["rows"]:
        table.append([row["model"], row["key_space"], f"{row['budget']:g}", f"{row['bytes_ratio']:.3f}", row["protocol"],
                      f"{row['perplexity']:.2f}",
                      f"{row['vs_full']['ratio']:.2f}x ({row['vs_full']['low']:.2f}-{row['vs_full']['high']:.2f})"])
    body += markdown_table(["model", "keys", "budget", "bytes", "protocol", "ppl", "x full (95%)"], table) + "\n\n"
    if result["pairs"]:
        body += "Pairs at the same budget and bytes (ratio of the first to the second; below 1 = the first reads better):\n\n"
        body += markdown_table(["first", "second", "budget", "protocol", "ratio (95%)", "verdict"],
                               [[p["first"], p["second"], f"{p['budget']:g}", p["protocol"],
                                 f"{p['ratio']:.3f} ({p['low']:.3f}-{p['high']:.3f})",
                                 {"lower": "first wins", "higher": "first loses", "tie": "tie"}[p["verdict"]]]
                                for p in result["pairs"]]) + "\n\n"
    if result["decode"]:
        body += f"Decode at {result['decode'][0]['context']} tokens of context, batch 1, one process"
        body += f" (`{result['decode_command']}`, measured alone):\n\n" if result.get("decode_command") else ":\n\n"
        body += markdown_table(["setting", "keys", "budget", "tokens/s", "x full"],
                               [[r["setting"], r["key_space"], f"{r['budget']:g}", f"{r['tokens_per_second']:.2f}",
                                 f"{r['vs_full']:.2f}"] for r in result["decode"]]) + "\n"
    return body


if __name__ == "__main__":
    raise SystemExit(main())
