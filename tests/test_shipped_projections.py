"""The shipped result of the training recipe: `embedded-matryoshka` loads onto the embedded model in
seconds, holds orthogonal bases, and is far better than nothing at half the cache on held-out text."""

from __future__ import annotations

import math

import pytest
import torch

from plugin.storage.artifacts import read_projections_config
from plugin.storage.loading import SHIPPED, load_model

pytestmark = pytest.mark.slow


def test_shipped_artifact_is_small_and_records_its_base() -> None:
    folder = SHIPPED["embedded-matryoshka"]
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 4_000_000, size  # U_K, U_V, mu_V only (no base weights)
    assert read_projections_config(str(folder))["base_model"] == "embedded"


def test_shipped_projections_keep_half_the_cache_close_to_full() -> None:
    from plugin.evaluation.perplexity import perplexity
    from plugin.storage.texts import load_texts, token_windows

    model, tokenizer = load_model("embedded-matryoshka")
    for attn in model.attention_layers()[:3]:
        key, value, _ = attn.kv_proj.bases()
        eye = torch.eye(key.shape[-1])
        assert float((key.detach().transpose(-1, -2) @ key.detach() - eye).abs().max()) < 1e-4
        assert float((value.detach().transpose(-1, -2) @ value.detach() - eye).abs().max()) < 1e-4
    windows = token_windows(tokenizer, load_texts(None, split="evaluation"), 512, 2048)
    model.set_kv_budget(1.0)
    full = perplexity(model, windows, progress=False)
    model.set_kv_budget(0.5)
    half = perplexity(model, windows, progress=False)
    assert math.isfinite(half) and full < half < 1.6 * full, (full, half)  # PCA alone: about 4x
    assert model.kv_cache_bytes_per_token() * 2 == model.full_cache_bytes_per_token()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_long_context_projections_hold_where_the_short_ones_fall_apart() -> None:
    """`embedded-matryoshka-longctx` (pre-RoPE keys, trained on 2,048-token windows): the last 256 tokens after
    1,792 of held-out context at half the cache stay near the full cache, and well below the 512-token recipe."""
    from plugin.evaluation.perplexity import long_context_nll
    from plugin.storage.texts import load_texts, token_windows

    folder = SHIPPED["embedded-matryoshka-longctx"]
    assert sum(p.stat().st_size for p in folder.iterdir()) < 4_000_000
    assert read_projections_config(str(folder))["kv_key_space"] == "pre-rope"
    longctx, tokenizer = load_model("embedded-matryoshka-longctx")
    short, _ = load_model("embedded-matryoshka")
    window = token_windows(tokenizer, load_texts(None, split="evaluation"), 2048, 2048)
    longctx.set_kv_budget(1.0)
    full = math.exp(float(long_context_nll(longctx, window, 256, progress=False).mean()))
    reads = {}
    for name, model in (("longctx", longctx), ("short", short)):
        model.set_kv_budget(0.5)
        reads[name] = math.exp(float(long_context_nll(model, window, 256, progress=False).mean()))
    assert full < reads["longctx"] < 2.0 * full and reads["longctx"] < 0.75 * reads["short"], (full, reads)
