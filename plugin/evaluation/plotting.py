"""PNG plots of evaluation sweeps (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any


def plot_sweep(rows: Iterable[dict[str, Any]], path: str, title: str = "", x: str = "budget") -> str:
    """Perplexity (log scale) vs `x` with one line per model; single-point models are drawn as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        series[str(row["model"])].append((float(row[x]), float(row["perplexity"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=name, linestyle="-" if len(points) > 1 else "none")
    ax.set_xlabel("KV-cache budget (fraction of the full cache)" if x == "budget" else x)
    ax.set_ylabel("perplexity (held-out, log scale)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
