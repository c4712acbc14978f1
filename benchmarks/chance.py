"""Chance and majority-class accuracy of the offline OpenCompass sets, computed from the scored items.

An accuracy means something only against what a model gets without reading the question: picking an
option uniformly at random (chance) or always giving the most frequent gold answer (majority class).
Both are computed from the same first-N items of each set's subset that benchmarks/accuracy.py scores.

  python -m benchmarks.chance --suite cpu --items 500     # print the rates of the five sets
"""

from __future__ import annotations

import argparse
import json
import string
from collections import Counter
from collections.abc import Sequence

LETTERS = set(string.ascii_uppercase)


def majority_rate(answers: Sequence[str]) -> float:
    """Share of the items whose gold answer is the most frequent one (the accuracy of always answering it)."""
    if not answers:
        raise ValueError("majority rate of an empty list of answers")
    return Counter(answers).most_common(1)[0][1] / len(answers)


def chance_rate(option_counts: Sequence[int]) -> float:
    """Expected accuracy of a uniform random pick among each item's options."""
    if not option_counts or min(option_counts) < 1:
        raise ValueError("chance rate needs at least one item with at least one option")
    return sum(1 / k for k in option_counts) / len(option_counts)


def item_rates(rows: Sequence[dict]) -> dict[str, object]:
    """Rates of a list of MCQ rows {"question", "A", "B", ..., "answer"} (opencompass_ext's format)."""
    answers = [str(row["answer"]) for row in rows]
    options = [sum(1 for key in row if key in LETTERS) for row in rows]
    top, _ = Counter(answers).most_common(1)[0]
    return {"n": len(rows), "chance": chance_rate(options), "majority": majority_rate(answers),
            "majority_answer": top, "options": sorted(set(options))}


def subset_rates(names: Sequence[str], suite: str, items: int | None) -> dict[str, dict[str, object]]:
    """{set: rates} over the first `items` rows (all if 0/None) of each set's `suite` file, as the benchmark scores."""
    from opencompass_ext import datasets as ds

    out = {}
    for name in names:
        with open(ds.dataset_path(name, suite)) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        out[name] = item_rates(rows[:items] if items else rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="csqa,piqa,obqa,siqa,boolq")
    parser.add_argument("--suite", default="cpu")
    parser.add_argument("--items", type=int, default=500)
    args = parser.parse_args()
    rates = subset_rates([n for n in args.datasets.split(",") if n], args.suite, args.items)
    for name, r in rates.items():
        print(f"{name}: n = {r['n']}, chance {100 * r['chance']:.1f}%, majority ({r['majority_answer']}) "
              f"{100 * r['majority']:.1f}%, options {r['options']}")


if __name__ == "__main__":
    main()
