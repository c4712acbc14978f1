"""Perplexity vs measured KV-cache bytes per token of the training-free baselines on the embedded model.

    .venv/bin/python -m benchmarks.baselines_table            # the table in docs/baselines.md
    .venv/bin/python -m benchmarks.baselines_table --windows 4 --budgets 1 0.5   # a quick look

Every row's bytes are read from the cache object after a forward (and checked against the model's
own accounting); the perplexity is over the same fixed windows of the held-out evaluation split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from plugin import baselines
from plugin.evaluation.perplexity import perplexity
from plugin.storage.assets import load_embedded_model
from plugin.storage.texts import load_texts, token_windows

BUDGETS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(baselines.METHODS), choices=baselines.METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--variances", nargs="*", type=float, default=[],
                        help="also rows at these explained-variance thresholds (ranks then vary by head/layer)")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-full", action="store_true", help="no full-model row (e.g. when splitting a run)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here, updated after each row")
    return parser.parse_args(argv)


def row(label: str, setting: str, model: torch.nn.Module, windows: torch.Tensor, full_bytes: int,
        batch_size: int) -> dict[str, Any]:
    start = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=batch_size, progress=False)
    measured = baselines.measure_cache_bytes_per_token(model, windows[:1])
    reported = model.kv_cache_bytes_per_token() if hasattr(model, "kv_cache_bytes_per_token") else full_bytes
    if measured != reported:
        raise AssertionError(f"{label} {setting}: cache holds {measured} B/token, model reports {reported}")
    result = {"method": label, "setting": setting, "perplexity": ppl, "cache_bytes_per_token": measured,
              "cache_ratio": measured / full_bytes, "seconds": time.perf_counter() - start}
    print(f"{label:18s} {setting:14s} ppl {ppl:9.3f}  {measured:7.0f} B/token ({measured / full_bytes:.3f})"
          f"  {result['seconds']:.0f}s", file=sys.stderr, flush=True)
    return result


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | setting | cache bytes/token (measured) | of full | perplexity |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['cache_bytes_per_token']:.0f} | "
                     f"{r['cache_ratio']:.3f} | {r['perplexity']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_embedded_model()
    windows = token_windows(tokenizer, load_texts(None, "evaluation"), args.seq_len,
                            max_tokens=args.windows * args.seq_len)[: args.windows]
    full_bytes = baselines.full_cache_bytes_per_token(base)
    settings = [("budget", b) for b in args.budgets] + [("variance", v) for v in args.variances]
    rows = [] if args.skip_full else [row("full model", "-", base, windows, full_bytes, args.batch_size)]
    save(rows, args.json)
    # Settings outermost: an interrupted run still leaves every method at the settings it reached.
    for kind, value in settings:
        for method in args.methods:
            model = baselines.build(method, base, **{kind: value})
            rows.append(row(method, f"{kind} {value:g}", model, windows, full_bytes, args.batch_size))
            save(rows, args.json)
            del model
    print(f"{windows.shape[0]} windows x {windows.shape[1]} tokens, evaluation split, "
          f"{next(base.parameters()).dtype}\n")
    print(markdown(sorted(rows, key=order)))
    return 0


def order(r: dict[str, Any]) -> tuple[int, str, float]:
    """Full model first, then by method and descending bytes."""
    rank = 0 if r["method"] == "full model" else 1 + list(baselines.METHODS).index(r["method"])
    return rank, r["setting"].split()[0], -r["cache_bytes_per_token"]


def save(rows: list[dict[str, Any]], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
