"""The pass-key retrieval task: prompt construction and the scorer on known answers."""

from __future__ import annotations

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from plugin.evaluation.retrieval import NEEDLE, QUESTION, answer_key, is_correct, passkey_items


@pytest.mark.parametrize("answer,key,expected", [
    (" 48213.", "48213", True),
    ("The pass key is 48213, as said.", "48213", True),
    ("48213", "48213", True),
    ("It is 12345 or 48213", "48213", False),  # the first number counts
    ("482130", "48213", False),  # six digits is not the key
    ("4821", "48213", False),
    ("no idea", "48213", False),
])
def test_scorer_on_known_answers(answer: str, key: str, expected: bool) -> None:
    assert is_correct(answer, key) is expected


def test_answer_key_reads_the_first_five_digit_number() -> None:
    assert answer_key("x 1234 y 99999 z 11111") == "99999"
    assert answer_key("") is None


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, decoded by concatenation: prompts round-trip exactly."""
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="?")


def test_items_place_the_needle_at_each_depth() -> None:
    tokenizer = _char_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog " * 40]
    items = passkey_items(tokenizer, texts, context_tokens=200, depths=(0.0, 0.5, 1.0), per_depth=3, seed=1)
    assert len(items) == 9 and len({i.key for i in items}) == 9
    for item in items:
        assert item.context_tokens == 200 == len(item.prompt)
        assert item.prompt.endswith(" " + QUESTION)
        position = item.prompt.find(item.key)
        assert position >= 0
        haystack = 200 - len(" " + QUESTION) - len(" " + NEEDLE.format(key=item.key) + " ")
        assert abs(position - len(" The pass key is ") - round(item.depth * haystack)) <= 1, (item.depth, position)
    assert passkey_items(tokenizer, texts, 200, (0.5,), 2, seed=1) == passkey_items(tokenizer, texts, 200, (0.5,), 2, seed=1)
    with pytest.raises(ValueError, match="not enough text"):
        passkey_items(tokenizer, ["a short text"], 200)
    assert "{key}" in NEEDLE
