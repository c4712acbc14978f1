"""The PNG figure of each benchmark, drawn from the JSON that benchmark writes (matplotlib, headless).

  python -m benchmarks.plots decode_memory docs/data/decode_memory.json docs/data/decode_memory.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def decode_memory_png(data: dict[str, Any], path: str | Path) -> Path:
    """Decode speed over the best transformers cache (left) and cache size (right) against context."""
    plt = _pyplot()
    speed: dict[tuple[str, int, str], list[tuple[int, float]]] = defaultdict(list)
    size: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for row in data["rows"]:
        key = (row["setting"], int(row["batch"]), row["dtype"])
        speed[key].append((int(row["context"]), float(row["speed_vs_best_baseline"])))
        if row["dtype"] == "float32":
            size[(row["setting"], int(row["batch"]))].append((int(row["context"]), row["cache_bytes"] / 2**20))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"dynamic": "black", "static": "tab:brown", "1.0": "tab:gray", "0.5": "tab:blue", "0.25": "tab:green"}
    batches = sorted({b for _, b in size})
    styles = {b: s for b, s in zip(batches, ["-", "--", ":", "-."])}
    for (setting, batch, dtype), points in sorted(speed.items()):
        xs, ys = zip(*sorted(points))
        left.plot(xs, ys, marker="o" if dtype == "float32" else "x", color=colours.get(setting),
                  linestyle=styles[batch], label=f"{setting}, batch {batch}, {dtype}")
    for (setting, batch), points in sorted(size.items()):
        if setting == "static":
            continue  # holds the same tokens as dynamic
        xs, ys = zip(*sorted(points))
        right.plot(xs, ys, marker="o", color=colours.get(setting), linestyle=styles[batch],
                   label=f"{setting}, batch {batch}")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_ylabel("decode tokens/s over the best baseline")
    right.set_yscale("log", base=2)
    right.set_ylabel("KV cache MiB, float32 (read from the cache object)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", ncol=2)
    return _save(plt, fig, path, "Decode after a real prefill: PcaLlama vs transformers' DynamicCache / StaticCache (CPU)")


def training_cost_png(data: dict[str, Any], path: str | Path) -> Path:
    """Seconds per optimizer step and peak RSS of each training variant.

    distill and plain (same trainable parameters, tokens and rank draws per micro-batch) are the comparison; any stock LLaMA-Factory
    rows are drawn grey and hatched because they train other parameters and are context only."""
    plt = _pyplot()
    rows = data["rows"]
    names = [r["variant"] for r in rows]
    headline = {"distill": "tab:blue", "plain": "tab:cyan", "distill-2draws": "tab:purple", "plain-2draws": "plum"}
    colours = [headline.get(n, "lightgray") for n in names]
    hatches = ["" if n in headline else "//" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((left, "s_per_step", "seconds per optimizer step"), (right, "peak_rss_mib", "peak RSS (MiB)")):
        bars = ax.bar(names, [r[key] or 0 for r in rows], color=colours, edgecolor="black", linewidth=0.5)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=15)
    for bar, row in zip(left.patches, rows):
        if row.get("ratio_to_plain"):
            left.annotate(f"{row['ratio_to_plain']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
    return _save(plt, fig, path, "Training cost: distillation vs plain Matryoshka training\n"
                                 "(hatched: LLaMA-Factory's stock trainer, other parameters, context only)")


def accuracy_png(data: dict[str, Any], path: str | Path) -> Path:
    """Accuracy per set and model row, with standard-error bars."""
    plt = _pyplot()
    rows = [r for r in data["rows"] if r["accuracy"] is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    sets = list(dict.fromkeys(r["dataset"] for r in rows))
    cell = {(r["model"], r["dataset"]): r for r in rows}
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(sets) + 0.4 * len(models)), 4.2))
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(sets))]
        found = [cell.get((model, s)) for s in sets]
        ax.bar(xs, [c["accuracy"] if c else 0 for c in found], width,
               yerr=[c["stderr"] if c else 0 for c in found], capsize=2, label=model)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylabel("accuracy (%), bars: ± 1 standard error")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path, "OpenCompass accuracy by KV budget (same items for every row)")


def longctx_png(data: dict[str, Any], path: str | Path) -> Path:
    """Last-512-token perplexity against cache bytes at each long context, one line per method (log scales)."""
    plt = _pyplot()
    contexts = sorted({int(r["context"]) for r in data["perplexity"]})
    methods = sorted({r["method"] for r in data["perplexity"]} - {"full"})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}  # the same colour in every panel
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.2 * len(contexts) + 2.2, 4.4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        points: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in data["perplexity"]:
            if int(row["context"]) == context:
                points[row["method"]].append((float(row["bytes_fraction"]), float(row["last512_perplexity"])))
        if "full" in points:
            ax.axhline(points.pop("full")[0][1], color="black", linestyle="--", linewidth=1)
        for method, xy in points.items():
            xy.sort()
            # the best reading at or below each byte level: what the method offers there
            envelope = [(x, min(y for bx, y in xy if bx <= x + 1e-9)) for x, _ in xy]
            ax.plot(*zip(*envelope), marker="o", markersize=3, color=colors[method])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cache bytes / bfloat16 full cache")
        ax.set_ylabel("perplexity of the last 512 tokens")
        ax.set_title(f"{context} tokens")
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color="black", linestyle="--", label="full cache")]
    handles += [plt.Line2D([], [], color=colors[m], marker="o", markersize=3, label=m) for m in methods]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.subplots_adjust(right=0.84)
    fig.suptitle("Long context: perplexity against measured cache bytes (lower left is better)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# Which line of the headline figure each measured method belongs to (a line holds its best configuration).
FRONTIER_LINES = {
    "ours: ranks x bits x eviction": ("recipe", "recipe searched", "evict-ranks-bits", "recipe240", "tiered",
                                      "longctx", "composition"),
    "KV quantization alone": ("quant-only", "hf-quanto", "hf-hqq"),
    "token eviction (kvpress)": ("kvpress-snapkv", "kvpress-expected-attention", "kvpress-knorm"),
}


def _envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The best reading at or below each byte level (what a method offers there), in byte order."""
    points = sorted(points)
    return [(x, min(y for bx, y in points if bx <= x + 1e-9)) for x, _ in points]


def frontier_png(short: dict[str, Any], long: dict[str, Any], path: str | Path, context: int = 4096,
                 full_short: float | None = None, long_title: str | None = None) -> Path:
    """The headline figure: perplexity against cache bytes (fraction of a bfloat16 full cache), short context
    (whole 512-token windows, benchmarks/frontier.py) and long context (the last 512 tokens after `context`,
    benchmarks/longctx.py) side by side, one line per method at its best configuration, the full cache dashed."""
    from matplotlib.ticker import FixedLocator, NullFormatter

    plt = _pyplot()
    lines = {"short": defaultdict(list), "long": defaultdict(list)}
    for row in short["rows"]:
        for name, methods in FRONTIER_LINES.items():
            if row["method"] in methods:
                lines["short"][name].append((float(row["bf16_ratio"]), float(row["perplexity"])))
    full_long = None
    for row in long["perplexity"]:
        if int(row["context"]) != context:
            continue
        if row["method"] == "full":
            full_long = float(row["last512_perplexity"])
        for name, methods in FRONTIER_LINES.items():
            if row["method"] in methods:
                lines["long"][name].append((float(row["bytes_fraction"]), float(row["last512_perplexity"])))
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(FRONTIER_LINES)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    panels = (("short", axes[0], f"512-token windows ({short.get('tokens', '')} tokens)", full_short),
              ("long", axes[1], long_title or f"last 512 tokens after {context}", full_long))
    for key, ax, title, full in panels:
        for name, points in lines[key].items():
            ax.plot(*zip(*_envelope(points)), marker="o", markersize=4, color=colors[name], label=name)
        if full is not None:
            ax.axhline(full, color="black", linestyle="--", linewidth=1, label=f"full cache ({full:.1f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        fractions = [1 / 16, 1 / 12, 1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 1]
        ax.xaxis.set_major_locator(FixedLocator(fractions))
        ax.set_xticklabels(["1/16", "1/12", "1/8", "1/6", "1/4", "1/3", "1/2", "1"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        low, high = ax.get_ylim()
        ticks = [t for t in (10, 15, 20, 25, 30, 40, 50, 70, 100, 150, 200, 300, 500) if low <= t <= high]
        if len(ticks) < 3:  # a narrow range (every point near the full cache): plain ticks across it
            ticks = sorted({round(low + (high - low) * i / 4, 1) for i in range(5)})
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.set_yticklabels([f"{t:g}" for t in ticks])
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("cache bytes / bfloat16 full cache")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path, "Bytes against quality: each method at its best configuration (SmolLM2-135M)")


PLOTS = {"decode_memory": decode_memory_png, "training_cost": training_cost_png, "accuracy": accuracy_png,
         "longctx": longctx_png}


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in PLOTS:
        sys.exit(f"usage: python -m benchmarks.plots {{{'|'.join(PLOTS)}}} DATA.json OUT.png")
    print(PLOTS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]))
