"""The age-tiered cache: recent tokens at the model's ranks, older ones demoted by slicing."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import to_pca

from plugin.cache import PcaCache, TieredPcaCache

IDS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
WINDOW, OLD = 6, (4, 8)


def _model(layers: int = 2, ranks: dict | None = None):
    model = to_pca(make_tiny_llama("gqa", attn_implementation="sdpa", num_hidden_layers=layers)).eval()
    if ranks:
        model.set_kv_ranks(ranks)
    return model


def _reference_step(model, cache: PcaCache, token: torch.Tensor, seen: int) -> torch.Tensor:
    """One decode step on a plain cache whose tokens older than WINDOW have their trailing dims zeroed:
    the independent reference for attending each segment at its own rank."""
    old = seen - WINDOW
    if old > 0:
        for layer in cache.layers:
            for entry, keys, values in zip(layer.signature, layer.key_groups, layer.value_groups):
                keys[..., :old, min(entry[0], OLD[0]):] = 0
                values[..., :old, min(entry[1], OLD[1]):] = 0
    return model(input_ids=token, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("ranks", [None, {"key": [[16, 6], [12, 2]], "value": [[10, 16], [4, 12]]}])
def test_tiers_equal_a_per_segment_reference_and_hold_the_formula_bytes(ranks) -> None:
    model = _model(ranks=ranks)
    table = model.get_kv_ranks()
    with torch.no_grad():
        tiered, plain = TieredPcaCache(WINDOW, *OLD, chunk=4), PcaCache(nested_bases=True)
        a = model(input_ids=IDS[:, :10], past_key_values=tiered, use_cache=True).logits
        b = model(input_ids=IDS[:, :10], past_key_values=plain, use_cache=True).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the prefill attends at the model's ranks
        for t in range(10, IDS.shape[1]):
            a = model(input_ids=IDS[:, t:t + 1], past_key_values=tiered, use_cache=True).logits
            b = _reference_step(model, plain, IDS[:, t:t + 1], t)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            seen = t + 1
            old, recent = max(0, seen - WINDOW), min(seen, WINDOW)
            expected = 0
            for kind, cap in (("key", OLD[0]), ("value", OLD[1])):
                for row in table[kind]:
                    expected += sum(min(r, cap) * old + r * recent for r in row)
            assert tiered.live_nbytes() == 2 * expected * 4  # batch 2, float32
            for layer in tiered.layers:  # each segment's buffers: at most 1/8 of its tokens plus one chunk more
                for segment in (layer.old, layer.recent):
                    held = segment.get_seq_length()
                    assert segment.capacity() <= held + held // 8 + segment.chunk
            assert tiered.get_seq_length() == seen


def test_the_tiered_cache_saves_bytes_and_differs_from_uniform_ranks_only_beyond_the_window() -> None:
    model = _model()
    with torch.no_grad():
        tiered, plain = TieredPcaCache(WINDOW, *OLD), PcaCache()
        model(input_ids=IDS[:, :WINDOW], past_key_values=tiered, use_cache=True)
        model(input_ids=IDS[:, :WINDOW], past_key_values=plain, use_cache=True)
        assert tiered.nbytes() == plain.nbytes()  # nothing is old yet
        for t in range(WINDOW, 30):
            step = IDS[:, t:t + 1]
            tiered_logits = model(input_ids=step, past_key_values=tiered, use_cache=True).logits
            plain_logits = model(input_ids=step, past_key_values=plain, use_cache=True).logits
        assert not torch.allclose(tiered_logits, plain_logits, atol=1e-4)
        assert tiered.nbytes() < plain.nbytes()


def test_batch_operations_and_refusals() -> None:
    model = _model()
    with torch.no_grad():
        cache = TieredPcaCache(WINDOW, *OLD)
        model(input_ids=IDS[:, :20], past_key_values=cache, use_cache=True)
        before = cache.nbytes()
        cache.batch_repeat_interleave(3)
        assert cache.nbytes() == 3 * before
        cache.batch_select_indices(torch.tensor([0, 2]))
        assert cache.nbytes() == before  # 2 of the 6 rows: as many as before
        with pytest.raises(ValueError, match="cannot be cropped"):
            cache.crop(10)
    with pytest.raises(ValueError, match="recent window"):
        TieredPcaCache(0, 4)
    with pytest.raises(ValueError, match="old ranks"):
        TieredPcaCache(8, 0)
