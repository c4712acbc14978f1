"""Paired bootstrap intervals, last-token scoring after long context, and the long-context CLI paths."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from helpers import save_tiny_base, to_pca

from plugin.cli import main
from plugin.evaluation.intervals import block_sums, paired_difference, paired_ratio, paired_share
from plugin.evaluation.perplexity import last_tokens_nll, long_context_nll


def test_two_blocks_give_the_known_interval() -> None:
    """Two 64-token blocks whose mean NLL differences are 0.1 and 0.3: resampling two blocks with replacement
    gives 0.1 (1/4), 0.2 (1/2) or 0.3 (1/4), so the 95% interval is exactly [e^0.1, e^0.3] around e^0.2."""
    nll = torch.cat([torch.full((64,), 2.1, dtype=torch.float64), torch.full((64,), 2.3, dtype=torch.float64)])
    reference = torch.full((128,), 2.0, dtype=torch.float64)
    interval = paired_ratio(nll, reference, block=64)
    assert interval.ratio == pytest.approx(math.exp(0.2), abs=1e-12)
    assert interval.low == pytest.approx(math.exp(0.1), abs=1e-12)
    assert interval.high == pytest.approx(math.exp(0.3), abs=1e-12)
    assert interval.blocks == 2 and interval.verdict() == "higher"
    assert paired_ratio(reference, nll, block=64).verdict() == "lower"


def test_pairing_removes_what_both_settings_share() -> None:
    """Token difficulty varies a lot but both settings see it: a constant shift has a zero-width interval,
    identical settings a tie at exactly 1."""
    hard = torch.rand(512, generator=torch.Generator().manual_seed(0)).double() * 8
    shifted = paired_ratio(hard + 0.05, hard)
    assert shifted.low == pytest.approx(math.exp(0.05)) and shifted.high == pytest.approx(math.exp(0.05))
    same = paired_ratio(hard, hard)
    assert (same.ratio, same.low, same.high, same.verdict()) == (1.0, 1.0, 1.0, "tie")
    noisy = paired_ratio(hard + torch.randn(512, generator=torch.Generator().manual_seed(1)).double() * 0.5, hard)
    assert noisy.low < noisy.ratio < noisy.high and noisy.verdict() == "tie"


def test_a_paired_difference_of_answers_has_the_known_interval() -> None:
    """Two items, one answered by both and one only by the first: resampled means of the differences are 0 (1/4),
    0.5 (1/2) or 1 (1/4), so the interval is [0, 1] around 0.5 and includes no difference."""
    interval = paired_difference([1, 1], [1, 0])
    assert (interval.ratio, interval.low, interval.high, interval.verdict()) == (0.5, 0.0, 1.0, "tie")
    many = paired_difference([1] * 60 + [0] * 40, [1] * 30 + [0] * 70)  # 30 more right out of 100, never fewer
    assert many.ratio == pytest.approx(0.3) and many.low > 0 and many.verdict() == "higher"
    with pytest.raises(ValueError, match="same non-empty"):
        paired_difference([1], [1, 0])


def test_a_paired_share_of_answers_has_the_known_interval() -> None:
    """The same answers keep all of them (every resample: exactly 1); one of two right answers lost keeps half,
    with resamples spanning none to all of them."""
    same = paired_share([1, 0, 1, 1], [1, 0, 1, 1])
    assert (same.ratio, same.low, same.high, same.verdict()) == (1.0, 1.0, 1.0, "tie")
    half = paired_share([1, 0] * 50, [1, 1] * 50)
    assert half.ratio == 0.5 and half.verdict() == "lower" and 0.35 < half.low < 0.5 < half.high < 0.65
    with pytest.raises(ValueError, match="reference right"):
        paired_share([1, 0], [0, 0])


def test_block_sums_keep_a_short_last_block_and_refuse_bad_input() -> None:
    assert block_sums(torch.ones(10, dtype=torch.float64), 4).tolist() == [4.0, 4.0, 2.0]
    with pytest.raises(ValueError, match="1-D"):
        block_sums(torch.ones(2, 3), 4)
    with pytest.raises(ValueError, match="same tokens"):
        paired_ratio(torch.ones(4), torch.ones(5))


@pytest.mark.parametrize("key_space", ["post-rope", "pre-rope"])
def test_last_tokens_through_the_cache_equal_one_forward(key_space: str) -> None:
    base = make_tiny_llama("gqa", attn_implementation="sdpa")
    pca = to_pca(base, key_space=key_space)
    ids = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = base(ids).logits[:, -33:-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -32:].flatten(), reduction="none")
    for model in (base, pca):  # full rank: the base model exactly, read through a cache or in one forward
        torch.testing.assert_close(long_context_nll(model, ids, scored=32, progress=False).float(), expected,
                                   atol=1e-4, rtol=0)
    pca.set_kv_budget(0.5)
    assert not torch.allclose(last_tokens_nll(pca, ids[:1], scored=32).float(), expected[:32], atol=1e-3)
    with pytest.raises(ValueError, match="no context"):
        last_tokens_nll(pca, ids[:1, :32], scored=32)


def test_long_context_eval_and_multi_length_calibration_commands(tmp_path) -> None:
    base_dir, text = tmp_path / "base", tmp_path / "text.txt"
    save_tiny_base(make_tiny_llama("gqa"), base_dir, text, words=2000)
    out = tmp_path / "pca"
    assert main(["calibrate", "--model", str(base_dir), "--data", str(text), "--tokens", "768",
                 "--seq-len", "32,128", "--out", str(out)]) == 0
    summary = json.loads((out / "pca_summary.json").read_text())
    assert summary["window_lengths"] == {"32": 12, "128": 3} and summary["key_space"] == "pre-rope"
    assert main(["calibrate", "--model", str(base_dir), "--data", str(text), "--seq-len", "512",
                 "--out", str(tmp_path / "too-long")]) == 2  # beyond max_position_embeddings (256)
    assert not (tmp_path / "too-long").exists()
    prefix = tmp_path / "long"
    assert main(["eval", "--model", str(out), "--label", "pca", "--data", str(text), "--budgets", "1,0.5",
                 "--context", "96,192", "--windows", "3,2", "--score-last", "32", "--out", str(prefix)]) == 0
    result = json.loads((tmp_path / "long.json").read_text())
    assert result["meta"]["windows"] == {"96": 3, "192": 2}
    rows = {(r["model"], r["setting"], r["context"]): r for r in result["rows"]}
    for context, windows in ((96, 3), (192, 2)):
        full, same, half = rows[("full cache", "1", context)], rows[("pca", "1", context)], rows[("pca", "0.5", context)]
        assert same["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)  # full rank is the full cache
        assert same["vs_full"]["low"] == pytest.approx(1.0, abs=1e-4)
        assert half["scored_tokens"] == 32 * windows and half["cache_ratio"] == 0.5
        assert half["vs_full"]["low"] <= half["vs_full"]["ratio"] <= half["vs_full"]["high"]
    assert main(["eval", "--model", str(out), "--data", str(text), "--context", "96", "--windows", "500",
                 "--score-last", "32", "--out", str(prefix)]) == 2  # the text holds fewer windows: one clear line
    assert main(["eval", "--model", str(out), "--data", str(text), "--context", "32", "--score-last", "32",
                 "--out", str(prefix)]) == 2


def test_passkey_summary_pairs_each_setting_with_the_full_cache_on_the_same_prompts() -> None:
    import argparse

    from plugin.commands.eval import PasskeySweep

    sweep = PasskeySweep(argparse.Namespace(passkey="128", passkey_depths="0", passkey_per_depth=1), ["text"])
    sweep._right = {("m", "1", 128): [1, 0, 1, 1], ("m", "0.5", 128): [1, 0, 0, 1], ("m", "0.25", 128): [1, 0, 1, 1]}
    rows = {row["setting"]: row for row in sweep.summary()}
    assert "vs_full" not in rows["1"] and rows["0.5"]["correct"] == 2 and rows["0.5"]["items"] == 4
    assert rows["0.5"]["vs_full"]["ratio"] == pytest.approx(-0.25) and rows["0.5"]["vs_full"]["against"] == "m 1"
    assert rows["0.25"]["vs_full"]["ratio"] == 0.0 and rows["0.25"]["vs_full"]["verdict"] == "tie"


def test_last_tokens_after_uneven_eviction_see_no_later_token() -> None:
    """A cache whose layers hold different numbers of tokens (PyramidKV-style) under transformers' own attention:
    one shared mask sliced to a shorter layer would let each scored token see the ones after it. The scored
    tokens read one at a time match a hand-made token-by-token pass; the one-forward pass would not."""
    import contextlib

    from transformers import DynamicCache

    from plugin.evaluation.perplexity import _ragged

    base = make_tiny_llama("gqa", attn_implementation="sdpa")
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(3))
    context, kept = 48, 12

    def uneven() -> DynamicCache:
        cache = DynamicCache()
        with torch.no_grad():
            base(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
        layer = cache.layers[1]
        layer.keys, layer.values = layer.keys[:, :, -kept:], layer.values[:, :, -kept:]
        return cache

    @contextlib.contextmanager
    def crop_after(cache: DynamicCache):
        yield
        layer = cache.layers[1]
        layer.keys, layer.values = layer.keys[:, :, -kept:], layer.values[:, :, -kept:]

    cache = uneven()
    assert _ragged(base, cache) and not _ragged(to_pca(base), cache)
    steps = []
    with torch.no_grad():
        for t in range(context, ids.shape[1] - 1):
            steps.append(base(input_ids=ids[:, t : t + 1], past_key_values=cache,
                              position_ids=torch.tensor([[t]]), use_cache=True).logits[0, -1])
    first = base(input_ids=ids[:, :context]).logits[0, -1]
    reference = torch.nn.functional.cross_entropy(torch.stack([first, *steps]), ids[0, context:], reduction="none")
    scored = ids.shape[1] - context
    live = DynamicCache()
    got = last_tokens_nll(base, ids, live, crop_after(live), scored=scored).float()
    torch.testing.assert_close(got, reference.detach(), atol=1e-5, rtol=0)
    one_forward = uneven()
    with torch.no_grad():
        leaky = base(input_ids=ids[:, context:-1], past_key_values=one_forward,
                     position_ids=torch.arange(context, ids.shape[1] - 1)[None], use_cache=True).logits[0]
    leaked = torch.nn.functional.cross_entropy(torch.cat([first[None], leaky]), ids[0, context:], reduction="none")
    assert not torch.allclose(leaked, reference, atol=1e-3)  # what the shared mask did before
