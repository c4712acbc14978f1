"""Answers a model generates for text prompts: batched with left padding, greedy or sampled.

The one generation loop of the project's evaluations (chat answers, pass-key retrieval). A call leaves
the model's training mode, the tokenizer's padding side and torch's random state as it found them, so
sampled answers are reproducible for a seed without disturbing the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 1,
    do_sample: bool = False,
    temperature: float = 0.7,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
    cache_for: Callable[[int], Any] | None = None,
    context_for: Callable[[int, int], AbstractContextManager] | None = None,
) -> list[str]:
    """The decoded new tokens (special tokens removed) of each prompt, in order.

    `cache_for(total_tokens)`, when given, makes the fresh cache each batch is generated through (e.g. an
    age-tiered or a transformers quantized cache); otherwise the model makes its own.
    `context_for(prompt_tokens, new_tokens)`, when given, is entered around each generate call (e.g. a
    token-eviction press, which acts on the prompt's prefill).
    """
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    # Greedy decoding unsets the sampling knobs a checkpoint's generation config may carry (no warnings).
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if do_sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    answers: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            chunk = list(prompts[start : start + batch_size])
            batch = tokenizer(chunk, return_tensors="pt", padding=len(chunk) > 1, add_special_tokens=False).to(device)
            length = batch["input_ids"].shape[1]
            extra = {} if cache_for is None else {"past_key_values": cache_for(length + max_new_tokens)}
            around = nullcontext() if context_for is None else context_for(length, max_new_tokens)
            with around:
                out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling, **extra)
            answers.extend(tokenizer.batch_decode(out[:, length:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return answers
