"""The PNG figure of each benchmark, drawn from the JSON that benchmark writes (matplotlib, headless).

  python benchmarks/plots.py decode_memory docs/decode_memory.json docs/decode_memory.png
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
    """Decode speed relative to the full cache, and peak RSS, against context (batch 1 solid, 8 dashed)."""
    plt = _pyplot()
    speed: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    rss: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for context, batch, setting, _fill, _mib, _share, peak, _tps, ratio in data["rows"]:
        speed[(setting, int(batch))].append((int(context), float(ratio)))
        rss[(setting, int(batch))].append((int(context), float(peak)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"full": "black", "1.0": "tab:gray", "0.5": "tab:blue", "0.25": "tab:green"}
    for ax, series, label in ((left, speed, "decode tokens/s relative to the full cache"), (right, rss, "peak RSS (MiB)")):
        for (setting, batch), points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            name = "full cache" if setting == "full" else f"PcaLlama {setting}"
            ax.plot(xs, ys, marker="o", color=colours.get(setting), linestyle="-" if batch == 1 else "--",
                    label=f"{name}, batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    left.axhline(1.0, color="black", linewidth=0.8)
    right.legend(fontsize=7)
    return _save(plt, fig, path, "Decode speed and memory by KV budget (CPU)")


def training_cost_png(data: dict[str, Any], path: str | Path) -> Path:
    """Seconds per optimizer step and peak RSS of each training variant."""
    plt = _pyplot()
    rows = data["rows"]
    names = [r["variant"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(names, [r["s_per_step"] for r in rows], color="tab:blue")
    left.set_ylabel("seconds per optimizer step")
    right.bar(names, [r["peak_rss_mib"] for r in rows], color="tab:orange")
    right.set_ylabel("peak RSS (MiB)")
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=15)
    return _save(plt, fig, path, "Training cost: Matryoshka trainers vs LLaMA-Factory's own (same model and data)")


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


PLOTS = {"decode_memory": decode_memory_png, "training_cost": training_cost_png, "accuracy": accuracy_png}


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in PLOTS:
        sys.exit(f"usage: python benchmarks/plots.py {{{'|'.join(PLOTS)}}} DATA.json OUT.png")
    print(PLOTS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]))
