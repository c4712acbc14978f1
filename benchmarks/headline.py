"""The README's headline table and the long-context targets table, read from the JSON each benchmark wrote.

Every figure in those two tables comes from a file under docs/ (the benchmark that wrote it is named in the
linked section), so a README figure cannot drift from its measurement: tests/test_docs.py re-renders both
blocks and compares them with README.md and docs/longctx.md.

    python -m benchmarks.headline          # rewrites the blocks between <!-- headline:start/end --> markers
    python -m benchmarks.headline --check  # exit 1 if a block differs from what the JSON gives
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from benchmarks.report import DATA, DOCS, ROOT, markdown_table

BLOCKS = {ROOT / "README.md": "headline", DOCS / "longctx.md": "longctx-targets"}


def _load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def _ks_row(data: dict, model: str, budget: float, protocol: str) -> dict:
    for row in data["rows"]:
        if row["model"] == model and row["budget"] == budget and row["protocol"] == protocol:
            return row
    raise KeyError(f"docs/data/key_space.json has no row ({model}, {budget}, {protocol})")


def _interval(cell: dict, digits: int = 2) -> str:
    return f"{cell['ratio']:.{digits}f}x ({cell['low']:.{digits}f}-{cell['high']:.{digits}f})"


def _contexts(data: dict) -> list[str]:
    return [p for p in dict.fromkeys(r["protocol"] for r in data["rows"]) if p.startswith("last")]


def long_context_cells(model: str, budget: float) -> list[str]:
    data = _load("key_space.json")
    return [_interval(_ks_row(data, model, budget, protocol)["vs_full"]) for protocol in _contexts(data)]


def eighth_points() -> dict[int, tuple[str, dict]]:
    """Per context, the best line of the long-context frontier at 1/8 of the bytes (bytes read from the cache,
    docs/data/longctx_frontier.json): (line, point), the allocator's file counted only where it holds its budget."""
    best = {}
    for entry in _load("longctx_frontier.json")["summary"]:
        if entry["name"] != "1/8":
            continue
        within = {line: point for line, point in entry["lines"].items() if point["bytes"] <= 0.125 + 1e-6}
        if within:
            best[entry["context"]] = min(within.items(), key=lambda kv: kv[1]["perplexity"])
    return best


def passkey(model: str, setting: str, context: int) -> dict:
    for row in _load("longctx_passkey.json")["passkey_summary"]:
        if row["model"] == model and row["setting"] == setting and row["context"] == context:
            return row
    raise KeyError(f"docs/data/longctx_passkey.json has no pass-key row ({model}, {setting}, {context})")


def readme_table() -> str:
    ks = _load("key_space.json")
    contexts = ", ".join(p.removeprefix("last 512 after ") for p in _contexts(ks))
    short_ours = _ks_row(ks, "shipped", 0.5, "512 windows")
    short_long = _ks_row(ks, "longctx", 0.5, "512 windows")
    frontier = {round(e["fraction"], 4): e for e in _load("frontier.json")["frontier"]}[0.25]
    decode = {(r["setting"], r["budget"]): r for r in ks["decode"]}
    best = eighth_points()
    keys = [passkey("longctx", "0.5", c) for c in (128, 256)]
    full_keys = [passkey("longctx", "1", c) for c in (128, 256)]
    serve = _load("serve.json")
    accuracy = {(r["model"], r["dataset"]): r for r in _load("accuracy_recipe.json")["rows"]}
    rows = [
        ["512-token windows, 50% of the cache (`embedded-matryoshka-longctx`)",
         (f"{short_long['perplexity']:.2f} vs {short_long['full_perplexity']:.2f} full: "
         f"{_interval(short_long['vs_full'])}"), "[key space](docs/benchmarks.md#key-basis-before-or-after-rope-at-equal-bytes)"],
        [f"last 512 tokens after {contexts}, 50% (`embedded-matryoshka-longctx`)",
         " / ".join(long_context_cells("longctx", 0.5)), "[long context](docs/longctx.md)"],
        ["the same, 25% of the cache", " / ".join(long_context_cells("longctx", 0.25)), "[long context](docs/longctx.md)"],
        ["the same, 50%, the 512-token projections (`embedded-matryoshka`)",
         " / ".join(long_context_cells("shipped", 0.5)), "[long context](docs/longctx.md)"],
        ["512-token windows, 50%, the 512-token projections (`embedded-matryoshka`)",
         f"{_interval(short_ours['vs_full'])}", "[long context](docs/longctx.md)"],
        ["pass-key retrieval at 128 / 256 tokens, 50% (long-context projections) vs full",
         " / ".join(f"{k['correct']}/{k['items']} vs {f['correct']}/{f['items']}" for k, f in zip(keys, full_keys)),
         "[long context](docs/longctx.md)"],
        ["1/8 of a bfloat16 cache's bytes at long context, best configuration measured",
         " / ".join(f"{c // 1024}k: {line} at {point['bytes']:.3f}, {point['vs_full']['ratio']:.2f}x full"
                    for c, (line, point) in sorted(best.items())) or "not measured yet",
         "[long context](docs/longctx.md#the-frontier-12-to-116-of-the-bytes)"],
        ["1/4 of the bytes, 512-token windows: ranks x bits vs 4-bit quantization alone",
         f"{frontier['ranks x bits']['perplexity']:.1f} vs {frontier['quantization alone']['perplexity']:.1f}",
         "[frontier](docs/benchmarks.md#bytes-vs-quality-ranks-x-bits-against-kv-quantization)"],
        [f"decode at {ks['decode'][0]['context']} tokens, batch 1, 50%: keys after / before RoPE vs the full cache",
         f"{decode[('shipped', 0.5)]['vs_full']:.2f}x / {decode[('longctx', 0.5)]['vs_full']:.2f}x",
         "[key space](docs/benchmarks.md#key-basis-before-or-after-rope-at-equal-bytes)"],
        ["`llamafactory-cli api` under load (1-8 clients)",
         f"{serve['meta']['total_requests']} requests, {serve['meta']['total_errors']} errors",
         "[serving](docs/benchmarks.md#serving-under-load-llamafactory-cli-api)"],
        ["OpenCompass PIQA, 500 items: base / 50% trained / 50% PCA",
         (f"{accuracy[('base-uncompressed', 'piqa')]['accuracy']:.1f} / {accuracy[('matryoshka-50%', 'piqa')]['accuracy']:.1f}"
         f" / {accuracy[('pca-50%', 'piqa')]['accuracy']:.1f}"), "[accuracy](docs/recipe.md)"],
    ]
    note = ("Ratios are perplexity over the full cache's on the same tokens, with the paired bootstrap 95% interval "
            "over 64-token blocks; every figure below is read from the JSON its benchmark wrote.\n\n")
    return note + markdown_table(["what", "measured", "where"], rows)


def longctx_targets() -> str:
    ks = _load("key_space.json")
    rows = []
    for budget, target in ((0.5, 1.5), (0.25, 3.0)):
        for protocol in _contexts(ks):
            cell = _ks_row(ks, "longctx", budget, protocol)["vs_full"]
            verdict = ("met" if cell["high"] <= target else f"met at the estimate (interval to {cell['high']:.2f}x)"
                       if cell["ratio"] <= target else f"missed by {cell['ratio'] - target:.2f}x")
            rows.append([f"ranks alone at {budget:.0%}, {protocol}", f"<= {target}x", _interval(cell), verdict])
    shipped = _ks_row(ks, "shipped", 0.5, "512 windows")["vs_full"]
    ours = _ks_row(ks, "longctx", 0.5, "512 windows")["vs_full"]
    rows.append(["512-token windows at 50%", f"<= {shipped['ratio']:.2f}x (the 512-token projections, same tokens)",
                 _interval(ours), "met" if ours["ratio"] <= shipped["ratio"] else
                 f"missed by {ours['ratio'] - shipped['ratio']:.2f}x"])
    for context in (128, 256):
        half, full = passkey("longctx", "0.5", context), passkey("longctx", "1", context)
        diff = half["vs_full"]
        rows.append([f"pass-key at {context} tokens, 50%", "at least the full cache's answers",
                     (f"{half['correct']}/{half['items']} vs {full['correct']}/{full['items']}: "
                     f"{diff['ratio']:+.2f} ({diff['low']:+.2f} to {diff['high']:+.2f})"),
                     "met" if half["correct"] >= full["correct"] else "missed"])
    for entry in (e for e in _load("longctx_frontier.json")["summary"] if e["name"] == "1/8"):
        pick = entry["lines"].get("allocator")
        wanted = "the allocator's pick has ranks < 100% and beats the best other line"
        if pick is None or "allocator_over_budget" in entry:
            why = "not searched" if pick is None else f"its file holds {entry['allocator_over_budget']:.3f}: search again"
            rows.append([f"1/8 of the bytes at {entry['context']}", wanted, why, "open"])
            continue
        compared = entry.get("allocator_vs_best_other")
        below = entry["allocator_uses_ranks_below_full"]
        rows.append([f"1/8 of the bytes at {entry['context']}", wanted,
                     f"{pick['setting'].removeprefix('longctx ')}: {pick['perplexity']:.2f}"
                     + (f", {_interval(compared, 3)} of {entry['best_other']['line']}" if compared else ""),
                     "met" if below and entry.get("strictly_better") else
                     "missed: full rank" if not below else "missed"])
    return markdown_table(["target", "wanted", "measured (95%)", "verdict"], rows)


def headline_figure(path: Path = DATA / "headline.png", context: int = 4096) -> Path:
    """The README's figure: the short-context frontier (frontier.json) beside long context at `context` tokens, where
    every point is scored on the same held-out windows: the long-context projections' ranks (key_space.json) and
    the 1/8-of-the-bytes rows with the full cache (longctx_evict.json).  The older long-context rows (longctx.json:
    quantization alone, kvpress) were scored on fewer windows and are not drawn beside them."""
    from benchmarks.plots import frontier_png

    ks = _load("key_space.json")
    ranks = [r for r in ks["rows"] if r["model"] == "longctx" and r["protocol"] == f"last 512 after {context}"]
    rows = [{"method": "longctx", "context": context, "bytes_fraction": row["bytes_ratio"],
             "last512_perplexity": row["perplexity"], "windows": int(ks["windows"][str(context)])} for row in ranks]
    evict = [r for r in _load("longctx_evict.json")["perplexity"] if int(r["context"]) == context]
    rows += evict
    windows = {r["windows"] for r in rows}
    full = next(r for r in evict if r["method"] == "full")["last512_perplexity"]
    if len(windows) != 1 or any(abs(full - r["full_perplexity"]) > 1e-6 * full for r in ranks):
        raise ValueError("key_space.json and longctx_evict.json were not scored on the same windows")
    short = _load("frontier.json")
    # the full cache on the frontier's tokens: budget 1 of quality.json, scored on the same 8,192 held-out tokens
    full_short = next(r["perplexity"] for r in _load("quality.json")["rows"] if r["budget"] == 1.0)
    return frontier_png(short, {"perplexity": rows}, path, context, full_short,
                        long_title=f"last 512 tokens after {context} ({windows.pop()} windows)")


RENDER = {"headline": readme_table, "longctx-targets": longctx_targets}


def block_pattern(key: str) -> re.Pattern:
    return re.compile(rf"(<!-- {re.escape(key)}:start -->\n).*?(\n<!-- {re.escape(key)}:end -->)", re.DOTALL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for path, key in BLOCKS.items():
        text = path.read_text()
        pattern = block_pattern(key)
        if not pattern.search(text):
            raise SystemExit(f"{path} has no <!-- {key}:start --> ... <!-- {key}:end --> block")
        new = pattern.sub(lambda m, key=key: m.group(1) + RENDER[key]() + m.group(2), text)
        if key == "headline" and not args.check:
            headline_figure()
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("out of date with the JSON: " + ", ".join(stale) + " (run python -m benchmarks.headline)")
        return 1
    print("up to date" if not stale else "rewrote " + ", ".join(stale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
