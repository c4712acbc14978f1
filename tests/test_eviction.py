"""Token eviction at prefill (plugin.cache.eviction.SnapEviction) on the projected and quantized caches."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import forward_with_layer_masks, to_pca

from plugin import SnapEviction
from plugin.cache import PcaCache

KEY_SPACES = ["post-rope", "pre-rope"]  # pre-RoPE: the cache also holds the positions each head kept


def _model(budget: float = 0.75, attn: str = "sdpa", key_space: str = "post-rope"):
    model = to_pca(make_tiny_llama("gqa", attn_implementation=attn), key_space=key_space)
    model.set_kv_budget(budget)
    return model


def _position_bytes(model, kept: int) -> int:
    """int32 positions of every kept token of every KV head and layer, held by an evicted pre-RoPE cache."""
    cfg = model.config
    return 4 * kept * cfg.num_key_value_heads * cfg.num_hidden_layers if cfg.kv_key_space == "pre-rope" else 0


def _ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_select_keeps_the_window_and_the_most_attended_tokens() -> None:
    press = SnapEviction(0.5, window=4, kernel=1)
    query = torch.zeros(1, 1, 2, 16, 8)
    key = torch.randn(1, 1, 16, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    query[..., -4:, 0] = 10.0
    key[..., [2, 5, 7, 9], 0] = torch.tensor([3.0, 2.0, 4.0, 1.0])  # the window's queries look at these
    index = press.select(query, key, scale=1.0)
    assert index.shape == (1, 1, 8)  # int(16 * 0.5)
    assert index[0, 0].tolist() == [2, 5, 7, 9, 12, 13, 14, 15]


def test_select_with_fewer_kept_tokens_than_the_window_keeps_the_newest() -> None:
    index = SnapEviction(0.75, window=8).select(torch.randn(2, 3, 1, 10, 4), torch.randn(2, 3, 10, 4), 1.0)
    assert index.shape == (2, 3, 2) and (index == torch.tensor([8, 9])).all()


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_no_eviction_equals_the_plain_cache(key_space: str) -> None:
    model, ids = _model(key_space=key_space), _ids(24, batch=2)
    plain = model.generate(ids, max_new_tokens=5, do_sample=False)
    with SnapEviction(0.0)(model):
        evicted = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(plain, evicted)


@pytest.mark.parametrize("key_space", KEY_SPACES)
@pytest.mark.parametrize("bits", [None, 4])
def test_the_cache_holds_only_the_kept_tokens_at_their_ranks_and_bits(bits: int | None, key_space: str) -> None:
    model, ids = _model(0.5, key_space=key_space), _ids(130)
    if bits is not None:
        model.set_kv_bits(bits)
    press = SnapEviction(0.5, window=16)
    cache = model.model.new_cache()
    with press(model):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    kept = press.kept(130)
    assert kept == 65
    assert all(layer.get_seq_length() == kept for layer in cache.layers)
    if bits is None:
        assert cache.nbytes() == kept * model.kv_cache_bytes_per_token(torch.float32) + _position_bytes(model, kept)
    else:
        full = model.model.new_cache()
        model(input_ids=ids[:, :kept], past_key_values=full, use_cache=True)
        # the same token count at the same ranks and bits holds the same bytes (plus the kept positions)
        assert cache.nbytes() == full.nbytes() + _position_bytes(model, kept)


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_an_age_tiered_cache_takes_the_kept_tokens_and_demotes_the_older_ones(key_space: str) -> None:
    from plugin.cache import TieredPcaCache

    model, ids = _model(1.0, key_space=key_space), _ids(100)
    cache = TieredPcaCache(16, 4)
    with SnapEviction(0.5, window=8)(model):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    model(input_ids=ids[:, :1], past_key_values=cache, position_ids=torch.tensor([[100]]), use_cache=True)
    assert all(layer.get_seq_length() == 51 for layer in cache.layers)
    per_token = model.kv_cache_bytes_per_token(torch.float32)
    held = cache.nbytes() - _position_bytes(model, 51)
    assert 51 * per_token * 4 / 16 < held < 51 * per_token  # older tokens held at rank 4 of 16


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_decoding_after_eviction_attends_to_the_kept_tokens_only(key_space: str) -> None:
    """With the window covering the prompt, each head keeps the newest half: the next token's logits equal a
    full forward whose last query is masked off the evicted older half (the prefill itself stays exact)."""
    model, ids = _model(0.75, attn="eager", key_space=key_space), _ids(21)
    prompt, length = ids[:, :20], 20
    press = SnapEviction(0.5, window=64)
    cache = model.model.new_cache()
    with press(model):
        first = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    step = model(input_ids=ids[:, 20:], past_key_values=cache, position_ids=torch.tensor([[length]]),
                 use_cache=True).logits[:, -1]

    mask = torch.ones(21, 21, dtype=torch.bool).tril()
    mask[20, : length - press.kept(length)] = False
    reference = model(input_ids=ids, attention_mask=mask[None, None]).logits
    assert torch.allclose(first, reference[:, :20], atol=1e-5)
    assert torch.allclose(step, reference[:, 20], atol=1e-5)
    assert not torch.allclose(step, model(input_ids=ids).logits[:, 20], atol=1e-3)  # eviction changed something


class _Recorded(SnapEviction):
    """SnapEviction that remembers, per layer, the indices each KV head kept (`[heads, kept]`)."""

    def on_kv(self, attention, step) -> None:
        super().on_kv(attention, step)
        if step.kept is not None:
            self.__dict__.setdefault("kept_by_layer", {})[step.layer_idx] = torch.cat([k[0] for k in step.kept])


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_heads_that_keep_different_tokens_decode_as_a_forward_masked_per_head(key_space: str) -> None:
    """A short window: each KV head keeps the tokens its own queries attend to most, not the same ones. The next
    token's logits equal a full forward whose last query is masked, per layer and per KV head, off what that head
    evicted."""
    model, ids = _model(0.75, attn="eager", key_space=key_space), _ids(21, seed=3)
    press = _Recorded(0.5, window=4, kernel=1)
    cache = model.model.new_cache()
    with press(model):
        model(input_ids=ids[:, :20], past_key_values=cache, use_cache=True)
    step = model(input_ids=ids[:, 20:], past_key_values=cache, position_ids=torch.tensor([[20]]),
                 use_cache=True).logits[:, -1]
    kept = press.kept_by_layer
    assert all(k.shape == (2, 10) for k in kept.values())
    assert any(not torch.equal(k[0], k[1]) for k in kept.values())  # the heads did keep different tokens

    def masked(layer: int) -> torch.Tensor:
        mask = torch.ones(1, 2, 21, 21, dtype=torch.bool).tril()  # one row of masks per KV head
        mask[0, :, 20, :20] = False
        for head in range(2):
            mask[0, head, 20, kept[layer][head]] = True
        return mask

    reference = forward_with_layer_masks(model, ids, [masked(i) for i in range(2)])[:, 20]
    assert torch.allclose(step, reference, atol=1e-5)
    shared = torch.ones(21, 21, dtype=torch.bool).tril()
    shared[20, : 20 - 10] = False  # every head on the newest half instead: another answer
    assert not torch.allclose(step, model(input_ids=ids, attention_mask=shared[None, None]).logits[:, 20], atol=1e-4)


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_generate_decodes_at_true_positions_after_eviction(key_space: str) -> None:
    model, ids = _model(0.75, key_space=key_space), _ids(40, batch=2)
    press = SnapEviction(0.6, window=8)
    with press(model):
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    cache = model.model.new_cache()
    with press(model):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
    tokens = [logits.argmax(-1, keepdim=True)]
    for offset in range(3):
        position = torch.full((2, 1), 40 + offset)
        logits = model(input_ids=tokens[-1], past_key_values=cache, position_ids=position, use_cache=True).logits[:, -1]
        tokens.append(logits.argmax(-1, keepdim=True))
    assert torch.equal(generated[:, 40:], torch.cat(tokens, dim=1))


def test_padding_is_refused_and_the_model_is_left_clean() -> None:
    model, ids = _model(), _ids(12, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="unpadded"), SnapEviction(0.5)(model):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert not any(attn.kv_hooks() for attn in model.attention_layers())
    assert not model._forward_pre_hooks
    cache = PcaCache()
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 12


@pytest.mark.parametrize("kwargs, match", [
    ({"compression_ratio": 1.0}, "compression_ratio"),
    ({"compression_ratio": -0.1}, "compression_ratio"),
    ({"compression_ratio": 0.5, "window": 0}, "window"),
    ({"compression_ratio": 0.5, "kernel": 4}, "kernel"),
])
def test_bad_settings_get_one_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SnapEviction(**kwargs)


def test_a_plain_llama_is_refused() -> None:
    with pytest.raises(TypeError, match="PcaLlama"), SnapEviction(0.5)(make_tiny_llama("gqa")):
        pass
