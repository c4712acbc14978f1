"""A synthetic, offline retrieval task: a pass key hidden at a chosen depth of real text.

Each prompt is a haystack of held-out text (the corpus' evaluation split by default) with one
sentence "The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at a relative depth,
followed by the question; the model answers by greedy generation and is right when the first
five-digit number of its answer is the key.  Deterministic for a seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
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


ANSWER_TOKENS = 8


def generate_answers(model: Any, tokenizer: Any, items: Sequence[PassKeyItem], max_new_tokens: int = ANSWER_TOKENS,
                     desc: str = "pass key", cache_for: Callable[[int], Any] | None = None,
                     context_for: Callable[[int, int], AbstractContextManager] | None = None) -> list[str]:
    """Greedy answers to the items' prompts, one prompt per generate call (no padding).

    `cache_for(total_tokens)`, when given, makes the fresh cache each prompt is generated through
    (e.g. an age-tiered or a transformers quantized cache); otherwise the model makes its own.
    `context_for(prompt_tokens, new_tokens)`, when given, is entered around each generate call (e.g. a
    token-eviction press, which acts on the prompt's prefill).
    """
    from .generation import generate_texts  # torch loads with it: this module's top level stays light

    return generate_texts(model, tokenizer, [item.prompt for item in items], max_new_tokens, desc=desc,
                          progress=len(items) >= 4, cache_for=cache_for, context_for=context_for)


def accuracy_by_depth(items: Sequence[PassKeyItem], answers: Sequence[str]) -> dict[float, tuple[int, int]]:
    """{depth: (correct, items)} in the items' depth order."""
    out: dict[float, tuple[int, int]] = {}
    for item, answer in zip(items, answers, strict=True):
        hits, total = out.get(item.depth, (0, 0))
        out[item.depth] = (hits + int(is_correct(answer, item.key)), total + 1)
    return out
