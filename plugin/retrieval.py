"""A synthetic, offline retrieval task: a pass key hidden at a chosen depth of real text.

Each prompt is a haystack of held-out text (the corpus' evaluation split by default) with one
sentence "The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at a relative depth,
followed by the question; the model answers by greedy generation and is right when the first
five-digit number of its answer is the key.  Deterministic for a seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
_KEY = re.compile(r"(?<!\d)(\d{5})(?!\d)")


@dataclass(frozen=True)
class PassKeyItem:
    prompt: str
    key: str
    depth: float  # 0 = at the start of the haystack, 1 = at its end
    context_tokens: int  # length of the prompt in tokens


def answer_key(answer: str) -> str | None:
    """The first five-digit number of a generated answer (None when there is none)."""
    match = _KEY.search(answer)
    return match.group(1) if match else None


def is_correct(answer: str, key: str) -> bool:
    return answer_key(answer) == key


def passkey_items(
    tokenizer: Any,
    texts: Sequence[str],
    context_tokens: int,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    per_depth: int = 4,
    seed: int = 0,
) -> list[PassKeyItem]:
    """Prompts of about `context_tokens` tokens, `per_depth` per depth, each from a different stretch of text."""
    if context_tokens < 64:
        raise ValueError(f"context_tokens must be at least 64, got {context_tokens}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {list(depths)}")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    rng = random.Random(seed)
    question = tokenizer(" " + QUESTION, add_special_tokens=False)["input_ids"]
    items = []
    for depth in depths:
        for _ in range(per_depth):
            key = f"{rng.randrange(10000, 100000)}"
            needle = tokenizer(" " + NEEDLE.format(key=key) + " ", add_special_tokens=False)["input_ids"]
            hay = context_tokens - len(needle) - len(question)
            if hay < 16 or hay > len(ids):
                raise ValueError(f"not enough text for {context_tokens}-token prompts (have {len(ids)} tokens)")
            start = rng.randrange(0, len(ids) - hay + 1)
            stretch = ids[start : start + hay]
            cut = round(depth * hay)
            prompt_ids = stretch[:cut] + needle + stretch[cut:] + question
            items.append(PassKeyItem(tokenizer.decode(prompt_ids), key, float(depth), len(prompt_ids)))
    return items
