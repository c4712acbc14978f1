"""The projected cache's preallocated buffers: in-place appends, identical results, exact live bytes, and
buffers that hold at most 1/8 of the cached tokens plus one chunk more."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import to_pca

from plugin.cache import PcaCache

RANKS = {"key": [[8, 16, 8, 4], [12, 12, 16, 4]], "value": [[8, 16, 4, 4], [16, 12, 8, 8]]}


def _model():
    model = to_pca(make_tiny_llama("mha", attn_implementation="sdpa"))
    model.set_kv_ranks(RANKS)
    return model


def _decode(model, cache, ids: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    out = [model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return out


def _bytes_formula(tokens: int, batch: int) -> int:
    return batch * tokens * sum(sum(row) for kind in ("key", "value") for row in RANKS[kind]) * 4


def _within_bound(layer) -> bool:
    """The capacity bound of PcaCacheLayer: n + n // 8 + chunk tokens for n cached."""
    held = layer.get_seq_length()
    return held <= layer.capacity() <= held + held // 8 + layer.chunk


def test_growth_policy_does_not_change_a_single_bit() -> None:
    model = _model()
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(0))
    reference = _decode(model, PcaCache(chunk=1), ids, 20)  # reallocates at every token, like concatenation
    for cache in (PcaCache(), PcaCache(chunk=16), PcaCache(max_length=80), PcaCache(reserve=70), PcaCache(reserve=30)):
        got = _decode(model, cache, ids, 20)
        assert all(torch.equal(a, b) for a, b in zip(reference, got))
        assert cache.live_nbytes() == _bytes_formula(70, 2)
        assert cache.nbytes() == _bytes_formula(cache.layers[0].capacity(), 2) >= cache.live_nbytes()


def test_appends_write_in_place_and_capacity_stays_within_an_eighth_plus_a_chunk() -> None:
    model = _model()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    cache = PcaCache()
    model(input_ids=ids[:, :10], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.capacity() == 10 and cache.nbytes() == _bytes_formula(10, 1)  # a prefill holds exactly itself
    pointers = {layer._keys[0].data_ptr()}
    for t in range(10, 300):
        model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        pointers.add(layer._keys[0].data_ptr())
        assert all(_within_bound(each) for each in cache.layers)
        assert cache.live_nbytes() == _bytes_formula(t + 1, 1)
        assert cache.nbytes() == _bytes_formula(layer.capacity(), 1)
    # amortised O(1): the capacity grows by at least 1/8 (or a chunk) per move, so 290 appends move it rarely
    assert len(pointers) <= 25


def test_a_long_prefill_and_one_more_token_hold_an_eighth_more_not_double() -> None:
    model = to_pca(make_tiny_llama("mha", attn_implementation="sdpa", num_hidden_layers=1))
    ids = torch.randint(0, 128, (1, 1025), generator=torch.Generator().manual_seed(9))
    cache = PcaCache()
    model(input_ids=ids[:, :1024], past_key_values=cache, use_cache=True)
    assert cache.layers[0].capacity() == 1024
    model(input_ids=ids[:, 1024:], past_key_values=cache, use_cache=True)
    assert 1025 <= cache.layers[0].capacity() <= 1025 + 1025 // 8 + 16
    short = PcaCache()
    model(input_ids=ids[:, :20], past_key_values=short, use_cache=True)
    assert short.layers[0].capacity() == 20
    model(input_ids=ids[:, 20:60], past_key_values=short, use_cache=True)  # a large append: exactly what is needed
    assert short.layers[0].capacity() == 60


def test_crop_then_decode_equals_the_first_decode() -> None:
    model = _model()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    cache = PcaCache(chunk=8)
    first = _decode(model, cache, ids, 10)
    cache.crop(25)
    assert cache.get_seq_length() == 25 and cache.live_nbytes() == _bytes_formula(25, 2)
    again = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(25, 40)]
    assert all(torch.equal(a, b) for a, b in zip(first[1 + 15:], again))


def test_reorder_and_repeat_follow_the_batch() -> None:
    model = _model()
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    cache, swapped = PcaCache(chunk=8), PcaCache(chunk=8)
    model(input_ids=ids[:, :29], past_key_values=cache, use_cache=True)
    model(input_ids=ids[[1, 0], :29], past_key_values=swapped, use_cache=True)
    cache.reorder_cache(torch.tensor([1, 0]))
    a = model(input_ids=ids[[1, 0], 29:], past_key_values=cache, use_cache=True).logits
    b = model(input_ids=ids[[1, 0], 29:], past_key_values=swapped, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    cache.batch_repeat_interleave(3)
    assert cache.layers[1].keys.shape[0] == 6 and cache.live_nbytes() == _bytes_formula(30, 6)
    assert cache.nbytes() == _bytes_formula(cache.layers[0].capacity(), 6) and _within_bound(cache.layers[0])
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert cache.live_nbytes() == _bytes_formula(30, 2)


def test_fixed_capacity_refuses_to_overflow() -> None:
    model = _model()
    cache = PcaCache(max_length=12)
    ids = torch.randint(0, 128, (1, 13))
    model(input_ids=ids[:, :12], past_key_values=cache, use_cache=True)
    assert cache.get_max_cache_shape() == 12
    with pytest.raises(ValueError, match="at most max_length=12"):
        model(input_ids=ids[:, 12:], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        PcaCache(chunk=0)


def test_reserve_allocates_the_expected_length_once_and_still_grows() -> None:
    model = _model()
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(6))
    cache = PcaCache(chunk=16, reserve=50)
    model(input_ids=ids[:, :10], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    pointer = layer._keys[0].data_ptr()
    for t in range(10, 50):
        model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    assert layer.capacity() == 50 and layer._keys[0].data_ptr() == pointer  # never moved, no spare room
    assert layer.nbytes() == layer.live_nbytes()
    model(input_ids=ids[:, 50:], past_key_values=cache, use_cache=True)
    assert layer.capacity() >= 60 and cache.nbytes() == _bytes_formula(60, 1)
    with pytest.raises(ValueError, match="reserve must be >= 0"):
        PcaCache(reserve=-1).update([torch.zeros(1, 1, 1, 1)], [torch.zeros(1, 1, 1, 1)], 0)


def test_generate_allocates_prompt_plus_new_tokens() -> None:
    model = _model()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    layer = cache.layers[0]
    assert layer.capacity() == layer.get_seq_length() == 12 + 8  # exactly what is cached (the last token never is)
    assert cache.nbytes() == cache.live_nbytes() == _bytes_formula(20, 2)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("target", ["budget", "table"])
def test_shrink_then_attend_equals_the_lower_rank_from_the_start(target: str, nested: bool) -> None:
    """Exact for the cached states: one layer, so the cached keys and values depend on nothing but the
    input (deeper layers' states depend on the ranks the layers below had during prefill).  Full-rank
    heads start in the model's own basis (default) or in U (`nested_bases`): both shrink exactly."""
    model = to_pca(make_tiny_llama("mha", attn_implementation="sdpa", num_hidden_layers=1))
    start = {"key": [[16, 12, 16, 8]], "value": [[16, 16, 8, 12]]}
    lower = {"key": [[4, 12, 8, 4]], "value": [[8, 4, 4, 12]]} if target == "table" else None
    model.set_kv_ranks(start)
    ids = torch.randint(0, 128, (2, 36), generator=torch.Generator().manual_seed(5))
    cache = PcaCache(chunk=8, nested_bases=nested)
    model(input_ids=ids[:, :30], past_key_values=cache, use_cache=True)
    if target == "budget":
        model.shrink_cache(cache, budget=0.5)
    else:
        model.shrink_cache(cache, ranks=lower)
    ranks = model.get_kv_ranks()
    assert ranks == (lower or {"key": [[8] * 4], "value": [[8] * 4]})
    after = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(30, 36)]
    fresh = PcaCache(chunk=8)
    model(input_ids=ids[:, :30], past_key_values=fresh, use_cache=True)  # the lower ranks from the start
    direct = [model(input_ids=ids[:, t:t + 1], past_key_values=fresh, use_cache=True).logits for t in range(30, 36)]
    for a, b in zip(after, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert cache.live_nbytes() == fresh.live_nbytes() == 2 * 36 * sum(ranks["key"][0] + ranks["value"][0]) * 4
    assert cache.nbytes() == fresh.nbytes() and _within_bound(cache.layers[0])  # a shrink keeps the capacity
    with pytest.raises(ValueError, match="can only shrink"):
        model.shrink_cache(cache, budget=1.0)


def test_a_fixed_capacity_cache_keeps_its_shape_through_a_shrink() -> None:
    model = _model()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(8))
    cache = PcaCache(max_length=24)
    model(input_ids=ids[:, :16], past_key_values=cache, use_cache=True)
    model.shrink_cache(cache, budget=0.25)
    for t in range(16, 24):  # appends after the shrink fit the same capacity
        model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    assert all(layer.capacity() == 24 for layer in cache.layers)
    assert cache.nbytes() == 24 * sum(sum(row) for kind in ("key", "value") for row in model.get_kv_ranks()[kind]) * 4
