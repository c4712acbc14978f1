"""Instruction splits, the first-sentence matching rule, chat formatting and the fiction text source."""

from __future__ import annotations

import pytest

from plugin.evaluation.chat import chat_prompt, chat_text, first_sentence, same_first_sentence
from plugin.evaluation.instructions import instructions
from plugin.storage.texts import load_texts


def test_instruction_splits_are_disjoint_and_large_enough() -> None:
    train, heldout = instructions("training"), instructions("heldout")
    assert len(heldout) >= 100 and len(train) >= 200
    assert not set(train) & set(heldout)
    assert len(set(heldout)) == len(heldout)
    assert instructions("heldout") == heldout  # deterministic
    with pytest.raises(ValueError, match="training, heldout"):
        instructions("test")


@pytest.mark.parametrize("text,expected", [
    ("The capital of France is Paris. It is large.", "The capital of France is Paris."),
    ("  Hoy, buen dia!  Y mas", "Hoy, buen dia!"),
    ("1. **Wear a helmet**\n2. Ride", "1."),
    ("no end at all", "no end at all"),
    ("", ""),
])
def test_first_sentence(text: str, expected: str) -> None:
    assert first_sentence(text) == expected


def test_matching_rule_needs_a_nonempty_equal_first_sentence() -> None:
    assert same_first_sentence("Paris is the capital. More.", "Paris is the capital. Other words")
    assert not same_first_sentence("Paris is the capital.", "Paris is a capital.")
    assert not same_first_sentence("", "")


def test_chat_text_is_the_prompt_plus_the_answer() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt = chat_prompt(tokenizer, "Hi?")
    assert prompt == "<user>Hi?</s><assistant>"
    assert chat_text(tokenizer, "Hi?", "Hello.") == "<user>Hi?</s><assistant>Hello.</s>"


def test_fiction_source_is_a_second_kind_of_english() -> None:
    texts = load_texts("fiction:")
    assert len(texts) == 12 and sum(len(t.split()) for t in texts) > 100_000
    assert "Sherlock Holmes" in texts[0] and "Congress" not in texts[0][:5000]
