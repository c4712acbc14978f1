"""Bytes against quality: held-out perplexity vs cache bytes for ranks x bits, and quantization alone.

Every configuration is scored on the same held-out windows in one process:

* `quant-only`: the base model with identity bases (k' = k, v' = v at full rank), i.e. KIVI-style
  quantization of the raw post-RoPE keys (per channel, blocks of --group tokens) and values (per
  token) in this project's quantized cache: what quantization alone gives;
* each --model (PCA or trained PcaLlama) at each budget x each bit width (uniform ranks);
* with --searched, each --model at each fraction of the table below with the ranks x bits that
  `mkv search-budget --bytes` would choose (plugin.budgets.rank_bits, fast mode, on calibration-split windows,
  by default 1 x 64 tokens and fraction 0.5 as in the quality benchmark's searched rows: one greedy
  descent for all fractions), scored on the same held-out windows.

Bytes are read from the cache object after one window (codes, float16 scales and zeros, tail) and
checked against the formula; the x axis is the fraction of a bfloat16 full cache.  Perplexity is
scored through the cache (each window's tokens attend to the dequantized states).

    python -m benchmarks.frontier --model outputs/demo/pca --label pca --model outputs/recipe/train --label recipe
    python -m benchmarks.frontier --model outputs/demo/matryoshka --label matryoshka --searched
    python -m benchmarks.frontier --model <tiny> --tokens 1024 --out /tmp/frontier     # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.report import DATA, machine, versions

FRACTIONS = (1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8)


def _measure(model, windows, batch_size: int) -> tuple[float, float]:
    """(perplexity, bytes per token read from a fresh cache after one window)."""
    import torch

    from plugin.evaluation.perplexity import perplexity

    cache = model.model.new_cache()
    with torch.no_grad():
        model(input_ids=windows[:1], past_key_values=cache, use_cache=True)
    measured = cache.nbytes() / windows.shape[1]
    return perplexity(model, windows, batch_size, progress=False), measured


def _searched_rows(label: str, model, calibration, windows, args) -> list[dict]:
    """The allocator's choice at each table fraction (one descent), scored on the held-out windows."""
    import torch

    from plugin.budgets.rank_bits import allocate_many, parse_choices

    start = time.perf_counter()
    allocations = allocate_many(model, FRACTIONS, calibration, parse_choices(args.quant_bits), group=args.group,
                                mode="fast", fraction=args.search_fraction)
    search_seconds = time.perf_counter() - start
    rows = []
    for fraction, alloc in zip(FRACTIONS, allocations):
        model.set_kv_ranks(alloc.ranks)
        if (alloc.key_bits, alloc.value_bits) == (16, 16):
            model.clear_kv_bits()
        else:
            model.set_kv_bits(alloc.key_bits, alloc.value_bits, group=args.group)
        start = time.perf_counter()
        ppl, measured = _measure(model, windows, args.batch_size)
        formula = model.kv_cache_bytes_per_token()
        assert abs(measured - formula) < 1e-6 * formula, (label, fraction, measured, formula)
        ratio = model.kv_cache_bytes_per_token(torch.bfloat16) / model.full_cache_bytes_per_token(torch.bfloat16)
        assert ratio <= fraction + 1e-9 and abs(ratio - alloc.bytes_fraction) < 1e-6, (ratio, alloc.bytes_fraction)
        name = f"{alloc.key_bits}" if alloc.key_bits == alloc.value_bits else f"{alloc.key_bits}/{alloc.value_bits}"
        rows.append({"method": f"{label} searched", "budget": round(model.kv_budget(), 6), "bits": name,
                     "perplexity": ppl, "bf16_ratio": ratio, "bytes_per_token_fp32_model": measured,
                     "target_fraction": fraction, "search_kl": alloc.kl, "search_seconds": search_seconds,
                     "seconds": time.perf_counter() - start})
        print(f"{label + ' searched':<12} target {fraction:.4f} bits {name:<5} ratio {ratio:.4f} ppl {ppl:.3f}",
              flush=True)
    model.set_kv_budget(1.0)
    model.clear_kv_bits()
    return rows


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
    parser.add_argument("--searched", nargs="?", const="*", default=None, metavar="LABELS",
                        help="also score each --model (or only these comma-separated labels) with the allocator's "
                             "ranks x bits at each table fraction")
    parser.add_argument("--search-samples", type=int, default=1, help="--searched: calibration windows (default 1)")
    parser.add_argument("--search-seq-len", type=int, default=64, help="--searched: tokens per window (default 64)")
    parser.add_argument("--search-fraction", type=float, default=0.5,
                        help="--searched: fast mode's share of candidates lowered per round (default 0.5)")
    parser.add_argument("--out", default=str(DATA / "frontier"), help="writes OUT.json and OUT.png")
    parser.add_argument("--render-only", action="store_true", help="redo OUT.png and the docs section from OUT.json")
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(Path(f"{args.out}.json").read_text())
        result.setdefault("labels", list(dict.fromkeys(r["method"].removesuffix(" searched") for r in result["rows"]
                                                       if r["method"] != "quant-only")))
        result["frontier"] = frontier_table(result["rows"], result["labels"])
        publish(result, args.out)
        return 0
    labels = args.label or [Path(m).name for m in args.model]
    if len(labels) != len(args.model):
        parser.error("give one --label per --model, or none")
    searched = set(labels) if args.searched == "*" else {x for x in (args.searched or "").split(",") if x}
    if searched - set(labels):
        parser.error(f"--searched names no --label: {', '.join(sorted(searched - set(labels)))}")

    import torch

    from plugin.cache.quant_codec import parse_bit_pair
    from plugin.storage.loading import load_model
    from plugin.storage.texts import load_texts, token_windows

    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    bits = [parse_bit_pair(b, "--bits") for b in args.bits.split(",") if b.strip()]
    quant_bits = [parse_bit_pair(b, "--quant-bits") for b in args.quant_bits.split(",") if b.strip()]
    base, tokenizer = load_model(args.base)
    windows = token_windows(tokenizer, load_texts(None, split="evaluation"), 512, args.tokens)
    from plugin.model.modeling import PcaLlamaForCausalLM

    runs = [("quant-only", PcaLlamaForCausalLM.from_llama(base).eval(), [1.0], quant_bits)]  # identity bases
    runs += [(label, load_model(spec)[0], budgets, bits) for spec, label in zip(args.model, labels)]
    rows = []
    if searched:
        calibration = token_windows(tokenizer, load_texts(None, split="calibration"), args.search_seq_len,
                                    args.search_samples * args.search_seq_len)[: args.search_samples]
        for label, model, _, _ in runs[1:]:
            if label in searched:
                rows += _searched_rows(label, model, calibration, windows, args)
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

    result = {"command": "python -m benchmarks.frontier " + " ".join(argv or sys.argv[1:]), "machine": machine(),
              "versions": versions(), "date": time.strftime("%Y-%m-%d"), "tokens": int(windows.numel()),
              "group": args.group, "labels": labels, "rows": rows, "frontier": frontier_table(rows, labels)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    publish(result, args.out)
    for entry in result["frontier"]:
        print(entry)
    return 0


def frontier_table(rows: list[dict], labels: list[str]) -> list[dict]:
    """Per table fraction: the lowest perplexity within those bytes, for quantization alone, for each
    checkpoint (uniform or searched ranks, any bits), and for any checkpoint ("ranks x bits")."""
    sides = [("quantization alone", lambda r: r["method"] == "quant-only"),
             ("ranks x bits", lambda r: r["method"] != "quant-only")]
    sides += [(label, lambda r, label=label: r["method"] in (label, f"{label} searched")) for label in labels]
    table = []
    for fraction in FRACTIONS:
        entry = {"fraction": fraction}
        for side, pick in sides:
            fits = [r for r in rows if pick(r) and r["bf16_ratio"] <= fraction + 1e-9]
            best = min(fits, key=lambda r: r["perplexity"]) if fits else None
            entry[side] = None if best is None else {k: best[k] for k in ("method", "budget", "bits", "bf16_ratio",
                                                                           "perplexity")}
        table.append(entry)
    return table


def plot(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in result["rows"]:
        if row["method"] == "quant-only":
            key = "quantization alone (KIVI-style)"
        elif row["method"].endswith(" searched"):
            key = f"{row['method']} (ranks x bits, per head)"
        else:
            key = f"{row['method']} x {row['bits']} bits"
        series.setdefault(key, []).append((row["bf16_ratio"], row["perplexity"]))
    for key, points in series.items():
        points.sort()
        style = "-" if "searched" in key or "quantization" in key else ":"
        ax.plot(*zip(*points), style, marker="o", markersize=4, label=key)
    for fraction in FRACTIONS:
        ax.axvline(fraction, color="grey", lw=0.5, alpha=0.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cache bytes (fraction of a bfloat16 full cache, log scale)")
    ax.set_ylabel(f"held-out perplexity ({result['tokens']} tokens, log)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    plt.close(fig)


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    how = "uniform" if not entry["method"].endswith(" searched") and entry["method"] != "quant-only" else ""
    rank = "" if entry["method"] == "quant-only" else f"{how or 'searched'} {entry['budget']:.3g} x "
    return f"{entry['perplexity']:.2f} ({rank}{entry['bits']} bits, {entry['bf16_ratio']:.3f})"


def render(result: dict) -> str:
    from benchmarks.report import markdown_table

    labels = result["labels"]
    lines = [f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ", f"Date: {result['date']}  ",
             f"Versions: {result['versions']}", "",
             (f"Held-out perplexity on the same {result['tokens']} tokens of the evaluation split (windows of 512, "
             "float32, the embedded SmolLM2-135M; full cache "
             f"{next(r['perplexity'] for r in result['rows'] if r['method'] == 'quant-only' and r['bits'] == '16'):.2f}) "
             "against the bytes the cache holds, read from the cache object after a window and checked against the "
             "formula (codes, float16 scales and zeros; keys per channel over blocks of "
             f"{result['group']} tokens, values per token), as a fraction of a bfloat16 full cache. "
             "`quantization alone` is this project's quantized cache on identity bases (KIVI-style, the base "
             "model's own keys and values); each checkpoint is shown with uniform ranks x uniform bits and with "
             "the ranks x bits that `mkv search-budget --bytes` chooses per (layer, KV head) on calibration text "
             "(`searched`). Each cell is the lowest perplexity within the fraction: perplexity (ranks, bits, bytes)."),
             ""]
    headers = ["bytes <=", "quantization alone"] + labels + ["best of ours vs quantization"]
    table = []
    for entry in result["frontier"]:
        quant = entry["quantization alone"]
        ours = entry["ranks x bits"]
        if quant and ours:
            verdict = "ours" if ours["perplexity"] < quant["perplexity"] else "quantization"
            verdict += f" ({ours['perplexity'] / quant['perplexity']:.2f}x)"
        else:
            verdict = "only ours fits" if ours else "-"
        table.append([f"1/{round(1 / entry['fraction'])}", _cell(quant)] + [_cell(entry[label]) for label in labels]
                     + [verdict])
    lines += [markdown_table(headers, table), ""]
    if result.get("note"):  # the reading of this run, kept in OUT.json by hand and re-rendered with it
        lines += [result["note"], ""]
    lines += ["![bytes vs perplexity](data/frontier.png)", ""]
    lines += ["All rows:", "", markdown_table(
        ["method", "ranks", "bits (K/V)", "bytes vs bf16", "perplexity"],
        [[r["method"], f"{r['budget']:.3f}", r["bits"], f"{r['bf16_ratio']:.4f}", f"{r['perplexity']:.2f}"]
         for r in sorted(result["rows"], key=lambda r: (r["method"], -r["bf16_ratio"]))])]
    return "\n".join(lines) + "\n"


def publish(result: dict, out: str) -> None:
    """OUT.png always; the docs/benchmarks.md section when OUT is the docs' own path."""
    plot(result, out)
    print(f"wrote {out}.json, {out}.png")
    if Path(out).resolve() == (DATA / "frontier").resolve():
        from benchmarks.report import write_section

        write_section("frontier", "Bytes vs quality: ranks x bits against KV quantization", render(result))
        print("updated docs/benchmarks.md")


if __name__ == "__main__":
    raise SystemExit(main())
