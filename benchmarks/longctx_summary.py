"""The long-context frontier's summary: each line's best point at or below each budget, the allocator's pick
against the best other line there (the paired interval of the two rows' ratio), and the docs section they render.

benchmarks.longctx_frontier measures the rows; this module reads them (docs/data/longctx_frontier.json) and holds
what both read: the budgets, the kept-token floors, the pass-key lengths and the lines.
"""

from __future__ import annotations

import math
import re

from benchmarks.report import markdown_table

BUDGETS = (1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8, 1 / 12, 1 / 16)
NAMES = {1 / 2: "1/2", 1 / 3: "1/3", 1 / 4: "1/4", 1 / 6: "1/6", 1 / 8: "1/8", 1 / 12: "1/12", 1 / 16: "1/16"}
WINDOWS = {2048: 8, 4096: 8, 8192: 4}
EVICT_BITS = 4
PASSKEY_LENGTHS = (128, 256)  # the base model answers 34/100 at 128 and 20/100 at 256 (docs/data/longctx_passkey.json)
PASSKEY_PER_DEPTH = 20  # x 5 depths: 100 prompts per length
FLOORS = ((1 / 4, 0.75), (1 / 4, 1.0), (1 / 8, 0.5))

# The line each row's method belongs to, in the order the summary lists them.
LINES = {
    "allocator": ("composition",),
    "ranks alone": ("longctx",),
    "bits alone (ours)": ("quant-only",),
    "bits alone (QuantizedCache)": ("hf-quanto",),
    f"{EVICT_BITS} bits x eviction, full rank (ours)": ("evict-ranks-bits",),
    "kvpress SnapKV": ("kvpress-snapkv",),
    "kvpress expected attention": ("kvpress-expected-attention",),
    "kvpress PyramidKV": ("kvpress-pyramidkv",),
    "kvpress AdaKV": ("kvpress-adakv",),
}
SLACK = 1e-6  # bytes read from a cache sit a hair off the budget's float
FLOOR_LINE = "allocator, every layer keeps >= {floor} of the prompt"  # one line per floor of FLOORS


def line_of(row: dict) -> str | None:
    if row["method"] == "composition":
        floor = re.search(r"-kept-([0-9.]+)", row["setting"].split(" (")[0])
        return FLOOR_LINE.format(floor=floor.group(1)) if floor else "allocator"
    return next((line for line, methods in LINES.items() if row["method"] in methods), None)


def ordered(lines: set[str]) -> list[str]:
    """The allocator, its floor lines by floor, then the other lines in LINES' order."""
    floors = sorted((line for line in lines if line not in LINES), key=lambda line: float(line.split(">= ")[1].split()[0]))
    return [line for line in LINES if line == "allocator" and line in lines] + floors + [
        line for line in LINES if line != "allocator" and line in lines]


def retrieval_of(result: dict, setting: str) -> dict[str, dict]:
    """{prompt length: correct, items, and against the full cache on the same prompts the paired difference of
    accuracies and the share of its right answers kept}, for the lengths where both were answered."""
    from plugin.evaluation.intervals import paired_difference, paired_share

    def answers(name: str, length: int) -> list[int]:
        rows = sorted((r for r in result.get("retrieval", []) if r["setting"] == name and r["context"] == length
                       and "right" in r), key=lambda r: r["depth"])
        return [x for r in rows for x in r["right"]]

    out = {}
    for length in PASSKEY_LENGTHS:
        mine, full = answers(setting, length), answers("full", length)
        if mine and len(mine) == len(full):
            out[str(length)] = {"correct": sum(mine), "items": len(mine),
                                "vs_full": paired_difference(mine, full).as_dict(),
                                "kept": paired_share(mine, full).as_dict() if sum(full) else None}
    return out


def best_at(rows: list[dict], budget: float) -> dict | None:
    """The row of lowest perplexity among `rows` that holds at most `budget` of the bytes."""
    within = [r for r in rows if r["bytes_fraction"] <= budget + SLACK]
    return min(within, key=lambda r: r["last512_perplexity"], default=None)


def summarize(result: dict) -> list[dict]:
    """Per context and budget: every line's best point at or below the budget, the allocator against the best
    other line (paired interval of the two rows' perplexity ratio), and the targets' verdicts."""
    from benchmarks.longctx import paired_ratio

    summary = []
    for context in sorted({r["context"] for r in result["perplexity"]}):
        rows = [r for r in result["perplexity"] if r["context"] == context]
        full = next((r for r in rows if r["method"] == "full"), None)
        by_line: dict[str, list[dict]] = {}
        for row in rows:
            if (line := line_of(row)) is not None:
                by_line.setdefault(line, []).append(row)
        for budget in BUDGETS:
            entry = {"context": context, "budget": budget, "name": NAMES[budget], "lines": {}}
            for line, members in by_line.items():
                if line == "allocator":  # the allocator's point at a budget is the file searched for it
                    best = next((r for r in members if f"alloc-{NAMES[budget]} " in r["setting"] + " "), None)
                elif line not in LINES:  # a floor's file searched for this budget
                    best = next((r for r in members if f"alloc-{NAMES[budget]}-kept-" in r["setting"]), None)
                else:
                    best = best_at(members, budget)
                if best is not None:
                    entry["lines"][line] = {"setting": best["setting"], "perplexity": best["last512_perplexity"],
                                            "bytes": best["bytes_fraction"], "vs_full": best.get("vs_full"),
                                            "retrieval": retrieval_of(result, best["setting"])}
            pick = entry["lines"].get("allocator")
            others = {k: v for k, v in entry["lines"].items() if not k.startswith("allocator")}
            if pick and pick["bytes"] > budget + SLACK:  # searched before its bytes were counted as held: no verdict
                entry["allocator_over_budget"] = pick["bytes"]
            elif pick and others:
                rival_line, rival = min(others.items(), key=lambda kv: kv[1]["perplexity"])
                a = next(r for r in rows if r["setting"] == pick["setting"])
                b = next(r for r in rows if r["setting"] == rival["setting"])
                vs = paired_ratio(a, b)
                entry["best_other"] = {"line": rival_line, **rival}
                entry["allocator_vs_best_other"] = vs
                entry["no_worse"] = vs["verdict"] in ("lower", "tie")
                entry["strictly_better"] = vs["verdict"] == "lower"
            if pick and full:
                entry["allocator_vs_full"] = pick["perplexity"] / full["last512_perplexity"]
            if pick:  # the row names its composition: "... (ranks R x B bits x ...)"
                found = re.search(r"\(ranks ([0-9.]+)(?: per head)? x", pick["setting"])
                entry["allocator_uses_ranks_below_full"] = bool(found) and float(found.group(1)) < 1.0
            if pick and pick["retrieval"]:  # the retrieval target: at least 80% of the full cache's right answers
                kept = [v["kept"] for v in pick["retrieval"].values() if v["kept"]]
                entry["allocator_keeps_80_percent_of_retrieval"] = bool(kept) and all(k["ratio"] >= 0.8 for k in kept)
            summary.append(entry)
    return summary


def render(result: dict, summary: list[dict], figure: str) -> str:
    from benchmarks.longctx import render as rows_section

    body = ("Every line at every budget is its best measured point holding at most that share of a bfloat16 full "
            "cache's bytes (bytes read from the cache after the prefill, key positions of an evicted pre-RoPE cache "
            "included); the cell is its perplexity of the last 512 tokens over the full cache's, with the paired "
            "95% interval. `allocator vs best other` is the paired ratio of the allocator's pick to the best other "
            "line at that budget: ▼ lower, ▲ higher (interval excluding 1), no mark a tie.\n\n")
    if projections := result.get("projections"):
        body = (f"Projections: `{projections['name']}`, digest {projections['sha256']}"
                + (f" ({projections['note']})" if projections.get("note") else "") + ".\n\n" + body)
    for context in sorted({e["context"] for e in summary}):
        entries = [e for e in summary if e["context"] == context]
        lines = ordered({line for e in entries for line in e["lines"]})
        table = []
        for entry in entries:
            cells = []
            for line in lines:
                point = entry["lines"].get(line)
                if point is None:
                    cells.append("-")
                    continue
                vs = point.get("vs_full") or {}
                cells.append(f"{vs.get('ratio', math.nan):.2f}x ({vs.get('low', math.nan):.2f}-"
                             f"{vs.get('high', math.nan):.2f}) @ {point['bytes']:.3f}")
            vs = entry.get("allocator_vs_best_other")
            mark = {"lower": " ▼", "higher": " ▲", "tie": ""}.get(vs["verdict"], "") if vs else ""
            over = entry.get("allocator_over_budget")
            cells.append(f"{vs['ratio']:.3f}x {entry['best_other']['line']} ({vs['low']:.3f}-{vs['high']:.3f}){mark}"
                         if vs else f"over its budget ({over:.3f} held): not compared" if over else "-")
            table.append([entry["name"], *cells])
        body += f"**{context} tokens** ({WINDOWS.get(context, '?')} held-out windows):\n\n"
        body += markdown_table(["bytes", *lines, "allocator vs best other"], table) + "\n\n"
        body += retrieval_table(entries, lines)
    body += rows_section(result, figure)
    return body


def retrieval_table(entries: list[dict], lines: list[str]) -> str:
    """Pass-key answers of the same points (same cells as the perplexity table), where they were measured."""
    if not any(point.get("retrieval") for e in entries for point in e["lines"].values()):
        return ""
    table = []
    for entry in entries:
        cells = []
        for line in lines:
            found = (entry["lines"].get(line) or {}).get("retrieval") or {}
            if not found:
                cells.append("-")
                continue
            lower = any(v["vs_full"]["verdict"] == "lower" for v in found.values())
            cells.append(", ".join(f"{v['correct']}/{v['items']}" for v in found.values()) + (" ▼" if lower else ""))
        kept = entry.get("allocator_keeps_80_percent_of_retrieval")
        cells.append("-" if kept is None else "yes" if kept else "no")
        table.append([entry["name"], *cells])
    lengths = " and ".join(map(str, PASSKEY_LENGTHS))
    return (f"Pass-key retrieval of the same points, right answers at {lengths}-token prompts (the full cache's on "
            "the same prompts in the `full` rows below; ▼: fewer than the full cache's, paired interval over prompts "
            "excluding 0; the allocator's files applied to each prompt's prefill as searched at this context):\n\n"
            + markdown_table(["bytes", *lines, "allocator keeps >= 80% of full's right answers"], table) + "\n\n")
