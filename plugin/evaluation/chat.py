"""Chat-template generation: the model's own answers, as training text and as a quality check.

Used to build self-distillation data (instructions with the base model's answers, formatted as
the model is served) and to compare compressed-cache answers with full-cache answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .generation import generate_texts

_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def chat_prompt(tokenizer: Any, instruction: str) -> str:
    """The instruction as the model is served it: one user turn and the assistant's opening."""
    messages = [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_text(tokenizer: Any, instruction: str, answer: str) -> str:
    """A whole conversation (user turn + assistant answer) as plain text in the chat template."""
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def generate_answers(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 0.7,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Answers (decoded, special tokens removed, stripped) to each instruction in the chat template, batched."""
    if not instructions:
        raise ValueError("no instructions to answer")
    prompts = [chat_prompt(tokenizer, text) for text in instructions]
    answers = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature, seed,
                             progress, desc)
    return [answer.strip() for answer in answers]


def first_sentence(text: str) -> str:
    """The answer's first sentence (up to . ! ? or a newline), whitespace-normalised."""
    text = " ".join(text.strip().split("\n", 1)[0].split()) if text.strip() else ""
    parts = _SENTENCE_END.split(text, maxsplit=1)
    return parts[0].strip() if parts else ""


def same_first_sentence(reference: str, candidate: str) -> bool:
    """The matching rule of the generation check: identical first sentences (non-empty).

    A 32-token answer usually holds one or two sentences; an equal first sentence is a strict,
    reproducible stand-in for "the same answer" that needs no judge model.
    """
    ref = first_sentence(reference)
    return bool(ref) and ref == first_sentence(candidate)
