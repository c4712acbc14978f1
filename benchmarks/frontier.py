"""Bytes against quality: held-out perplexity vs cache bytes for ranks x bits, and quantization alone.

Every configuration is scored on the same held-out windows in one process:

* `quant-only`: the base model with identity bases (k' = k, v' = v at full rank), i.e. KIVI-style
  quantization of the raw post-RoPE keys (per channel, blocks of --group tokens) and values (per
  token) in this project's quantized cache: what quantization alone gives;
* each --model (PCA or trained PcaLlama) at each budget x each bit width.

Bytes are read from the cache object after one window (codes, float16 scales and zeros, tail) and
checked against the formula; the x axis is the fraction of a bfloat16 full cache.  Perplexity is
scored through the cache (each window's tokens attend to the dequantized states).

    python benchmarks/frontier.py --model outputs/demo/pca --label pca --model outputs/recipe/train --label recipe
    python benchmarks/frontier.py --model <tiny> --tokens 1024 --out /tmp/frontier     # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, versions

FRACTIONS = (1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8)


def _measure(model, windows, batch_size: int) -> tuple[float, float]:
    """(perplexity, bytes per token read from a fresh cache after one window)."""
    import torch

    from plugin.evaluate import perplexity

    cache = model.model.new_cache()
    with torch.no_grad():
        model(input_ids=windows[:1], past_key_values=cache, use_cache=True)
    measured = cache.nbytes() / windows.shape[1]
    return perplexity(model, windows, batch_size, progress=False), measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", default=[], help="PcaLlama checkpoint (repeatable)")
    parser.add_argument("--label", action="append", default=None, help="name per --model")
    parser.add_argument("--base", default="embedded", help="base Llama for quant-only (default embedded)")
    parser.add_argument("--budgets", default="0.75,0.5,0.375,0.25")
    parser.add_argument("--bits", default="16,4,2", help="bit widths for the --model rows (default 16,4,2)")
    parser.add_argument("--quant-bits", default="16,8,4,4/2,2", help="quant-only widths, K or K/V (default 16,8,4,4/2,2)")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "docs" / "frontier"), help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    labels = args.label or [Path(m).name for m in args.model]
    if len(labels) != len(args.model):
        parser.error("give one --label per --model, or none")

    import torch

    from plugin.cache.quantize import parse_bit_pair
    from plugin.data import load_texts, token_windows
    from plugin.loading import load_model

    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    bits = [parse_bit_pair(b, "--bits") for b in args.bits.split(",") if b.strip()]
    quant_bits = [parse_bit_pair(b, "--quant-bits") for b in args.quant_bits.split(",") if b.strip()]
    base, tokenizer = load_model(args.base)
    windows = token_windows(tokenizer, load_texts(None, split="evaluation"), 512, args.tokens)
    from plugin.modeling import PcaLlamaForCausalLM

    runs = [("quant-only", PcaLlamaForCausalLM.from_llama(base).eval(), [1.0], quant_bits)]  # identity bases
    runs += [(label, load_model(spec)[0], budgets, bits) for spec, label in zip(args.model, labels)]
    rows = []
    for label, model, model_budgets, model_bits in runs:
        for key_bits, value_bits in model_bits:
            for budget in model_budgets:
                model.set_kv_budget(budget)
                if (key_bits, value_bits) == (16, 16):
                    model.clear_kv_bits()
                else:
                    model.set_kv_bits(key_bits, value_bits, group=args.group)
                start = time.perf_counter()
                ppl, measured = _measure(model, windows, args.batch_size)
                formula = model.kv_cache_bytes_per_token()
                assert abs(measured - formula) < 1e-6 * formula, (label, budget, key_bits, measured, formula)
                ratio = model.kv_cache_bytes_per_token(torch.bfloat16) / model.full_cache_bytes_per_token(torch.bfloat16)
                name = f"{key_bits}" if key_bits == value_bits else f"{key_bits}/{value_bits}"
                rows.append({"method": label, "budget": budget, "bits": name, "perplexity": ppl,
                             "bf16_ratio": ratio, "bytes_per_token_fp32_model": measured,
                             "seconds": time.perf_counter() - start})
                print(f"{label:<12} budget {budget:<6g} bits {name:<5} ratio {ratio:.4f} ppl {ppl:.3f}", flush=True)
        del model

    table = []
    for fraction in FRACTIONS:
        entry = {"fraction": fraction}
        for side, pick in (("quantization alone", lambda r: r["method"] == "quant-only"),
                           ("ranks x bits", lambda r: r["method"] != "quant-only")):
            fits = [r for r in rows if pick(r) and r["bf16_ratio"] <= fraction + 1e-9]
            best = min(fits, key=lambda r: r["perplexity"]) if fits else None
            entry[side] = None if best is None else {k: best[k] for k in ("method", "budget", "bits", "bf16_ratio",
                                                                           "perplexity")}
        table.append(entry)
    result = {"command": "python benchmarks/frontier.py " + " ".join(argv or sys.argv[1:]), "machine": machine(),
              "versions": versions(), "date": time.strftime("%Y-%m-%d"), "tokens": int(windows.numel()),
              "group": args.group, "rows": rows, "frontier": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        key = "quantization alone (KIVI-style)" if row["method"] == "quant-only" else f"{row['method']} x {row['bits']} bits"
        series.setdefault(key, []).append((row["bf16_ratio"], row["perplexity"]))
    for key, points in series.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cache bytes (fraction of a bfloat16 full cache, log scale)")
    ax.set_ylabel(f"held-out perplexity ({int(windows.numel())} tokens, log)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=120)
    print(f"wrote {args.out}.json, {args.out}.png")
    for entry in table:
        print(entry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
