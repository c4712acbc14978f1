"""Request checks of ``llamafactory-cli api`` serving a PcaLlama: a bad request gets an error response up front.

LLaMA-Factory's OpenAI-compatible server answers whatever model name a request gives, checks the
messages only once a streamed response has already started (so a client sees a broken stream instead
of an error), and passes ``max_tokens`` to ``generate`` unchecked, where a PcaLlama reserves its cache
for prompt + max_tokens tokens at once.  The import hook runs :func:`validate` before the stock
handlers of ``/v1/chat/completions``, streamed or not, when the served model is a PcaLlama; every
refusal is the API's own error response (an ``HTTPException``: status code and ``{"detail": ...}``),
and nothing else changes: a model that is not a PcaLlama is served as LLaMA-Factory serves it.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_MODEL_NAME = "gpt-3.5-turbo"  # what LLaMA-Factory's /v1/models lists without API_MODEL_NAME


def served_name() -> str:
    return os.getenv("API_MODEL_NAME", DEFAULT_MODEL_NAME)


def validate(request: Any, chat_model: Any) -> None:
    """Raise the API's error response for a request the served PcaLlama cannot answer as asked."""
    from fastapi import HTTPException, status

    from .projection_params import find_pca_model

    model = getattr(getattr(chat_model, "engine", None), "model", None)
    if find_pca_model(model) is None:
        return
    if request.model != served_name():
        raise HTTPException(
            status_code=status.HTTP_404_NOT_FOUND,
            detail=f"model {request.model!r} is not served here; this server serves {served_name()!r} "
            "(GET /v1/models lists it; API_MODEL_NAME sets it)",
        )
    if not request.messages:
        raise HTTPException(status_code=status.HTTP_400_BAD_REQUEST,
                            detail="messages is empty; give at least one user message")
    if request.max_tokens is None:
        return
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if request.max_tokens < 1:
        raise HTTPException(status_code=status.HTTP_400_BAD_REQUEST,
                            detail=f"max_tokens must be at least 1; got {request.max_tokens}")
    prompt = prompt_tokens(request, chat_model.engine)
    if context and (prompt or 0) + request.max_tokens > context:
        room = f"at most {context - prompt}" if prompt is not None and prompt < context else "fewer tokens"
        raise HTTPException(
            status_code=status.HTTP_400_BAD_REQUEST,
            detail=f"the prompt's {prompt if prompt is not None else '?'} tokens + max_tokens {request.max_tokens} "
            f"exceed the model's context of {context} tokens; ask for {room}",
        )


def prompt_tokens(request: Any, engine: Any) -> int | None:
    """Tokens of the prompt as the engine will build it (None for content that is not plain text).

    Runs LLaMA-Factory's own message checks on a copy (its 400 responses, now before a stream starts).
    """
    if any(not isinstance(message.content, (str, type(None))) for message in request.messages):
        return None  # images / audio / video are read by the handler itself, once
    from llamafactory.api.chat import _process_request

    messages, system, tools, *_ = _process_request(request.model_copy(deep=True))
    ids, _ = engine.template.encode_oneturn(engine.tokenizer, [*messages, {"role": "assistant", "content": ""}],
                                            system, tools)
    return len(ids)
