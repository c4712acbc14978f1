"""Tokens x ranks x bits under one byte budget (plugin.budgets.composition) and per-layer eviction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from helpers import forward_with_layer_masks, save_tiny_base, to_pca

from plugin import SnapEviction
from plugin.budgets.cache_bytes import (
    POSITION_BYTES,
    ByteFrame,
    formula_bytes,
    held_bytes,
    layer_rates,
    least_eviction,
    positions_share,
    tail_tokens,
)
from plugin.budgets.composition import _filled_of, _finalists, _option_rates, _pyramid_of, compose, window_nll
from plugin.budgets.composition_grid import Composition, candidates, composition_rates, value_cut
from plugin.cache.eviction import prefill_ratio
from plugin.cli import main

KEY_SPACES = ["post-rope", "pre-rope"]


def _model(key_space: str = "pre-rope", attn: str = "sdpa"):
    return to_pca(make_tiny_llama("gqa", attn_implementation=attn), key_space=key_space)


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_layers_at_ratio_zero_hold_the_plain_cache(key_space: str) -> None:
    model, ids = _model(key_space), _ids(40)
    plain = model.model.new_cache()
    reference = model(input_ids=ids, past_key_values=plain, use_cache=True).logits
    cache = model.model.new_cache()
    with SnapEviction(0.5, window=8, layer_ratios=(0.5, 0.0))(model):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    assert torch.equal(logits, reference)  # the prefill's own attention is exact
    assert cache.layers[0].get_seq_length() == 20 and cache.layers[1].get_seq_length() == 40
    assert torch.equal(cache.layers[1].keys, plain.layers[1].keys)
    assert torch.equal(cache.layers[1].values, plain.layers[1].values)
    every = model.model.new_cache()
    with SnapEviction(0.0, layer_ratios=(0.0, 0.0))(model):
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                           model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=every))


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_per_layer_eviction_next_token_equals_a_forward_masked_per_layer(key_space: str) -> None:
    """Each layer keeps its own share (the window covers the prompt: each keeps its newest tokens); the next
    token's logits equal a full forward whose last query is masked, layer by layer, off what that layer evicted."""
    model, ids = _model(key_space, attn="eager"), _ids(21)
    model.set_kv_budget(0.75)
    press = SnapEviction(0.5, window=64, layer_ratios=(0.5, 0.25))
    cache = model.model.new_cache()
    with press(model):
        model(input_ids=ids[:, :20], past_key_values=cache, use_cache=True)
    step = model(input_ids=ids[:, 20:], past_key_values=cache, position_ids=torch.tensor([[20]]),
                 use_cache=True).logits[:, -1]
    assert [layer.get_seq_length() - 1 for layer in cache.layers] == [press.kept(20, 0), press.kept(20, 1)] == [10, 15]

    def masked(layer: int) -> torch.Tensor:
        mask = torch.ones(21, 21, dtype=torch.bool).tril()
        mask[20, : 20 - press.kept(20, layer)] = False
        return mask[None, None]

    reference = forward_with_layer_masks(model, ids, [masked(i) for i in range(2)])[:, 20]
    assert torch.allclose(step, reference, atol=1e-5)


def test_pyramid_keeps_more_below_and_the_same_mean() -> None:
    press = SnapEviction.pyramid(0.6, 4, spread=0.5)
    kept = [1 - r for r in press.layer_ratios]
    assert kept == sorted(kept, reverse=True) and kept[0] == pytest.approx(0.6) and kept[-1] == pytest.approx(0.2)
    assert sum(kept) / 4 == pytest.approx(0.4)
    narrow = SnapEviction.pyramid(0.2, 3, spread=0.5)  # 0.8 * 1.5 > 1: the spread narrows to fit
    assert max(1 - r for r in narrow.layer_ratios) <= 1.0
    assert sum(1 - r for r in narrow.layer_ratios) / 3 == pytest.approx(0.8)


def test_bad_layer_ratios_get_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        SnapEviction(0.5, layer_ratios=(0.5, 1.0))
    with pytest.raises(ValueError, match="one ratio per layer"), SnapEviction(0.5, layer_ratios=(0.5,))(_model()):
        pass
    assert prefill_ratio(0.5, 688, 512) == pytest.approx(1 - 88 / 688)
    with pytest.raises(ValueError, match="kept whole already"):
        prefill_ratio(0.5, 88, 512)


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_no_composition_exceeds_its_byte_budget(key_space: str) -> None:
    """Every composition the allocator can emit, run through a real prefill at the context: the bytes the cache
    holds (read from the cache object) stay within the budget; unquantized, the formula equals the buffers."""
    model = _model(key_space)
    window = _ids(96)[0]
    for budget in (0.5, 0.25, 0.125):
        options = candidates(model, budget, 96, 16, group=16)
        assert any(any(o.layer_ratios) for o in options) and any(o.rank_budget < 1 for o in options)
        assert {o.profile for o in options} == {"uniform", "pyramid"}
        for option in options:
            _, used = window_nll(model, option, window, 16, group=16)
            assert used <= budget + 1e-9, (option.label(), used)
            if (option.key_bits, option.value_bits) == (16, 16):
                cache = model.model.new_cache()
                option.apply(model, 16)
                with option.press()(model) if option.press() else torch.no_grad():
                    model(input_ids=window[None, :80], past_key_values=cache, use_cache=True)
                live = cache.live_nbytes() - cache._position_bytes()
                assert held_bytes(model, cache) - cache._position_bytes() == pytest.approx(live / 2)  # fp32 -> bf16
    assert model.full_cache_bytes_per_token(torch.bfloat16) == 2 * 2 * 2 * 16 * 2


def test_a_kept_token_floor_leaves_out_every_composition_that_keeps_less() -> None:
    """--min-kept: every layer of every composition keeps at least that share of the prompt; a floor of 1 leaves
    only the compositions that evict nothing, and one too high for the budget says so in one error."""
    model = _model()
    context, scored = 96, 16
    free = candidates(model, 0.125, context, scored, group=16)
    floored = candidates(model, 0.125, context, scored, group=16, min_kept=0.5)
    assert set(floored) < set(free)  # a floor only removes
    assert any(max(o.layer_ratios) > 0.5 for o in free)
    assert floored and all(max(o.layer_ratios) <= 0.5 + 1e-9 for o in floored)
    assert all(not any(o.layer_ratios) for o in candidates(model, 0.25, context, scored, group=16, min_kept=1.0))
    windows = _ids(context)
    with pytest.raises(ValueError, match="--min-kept"):
        compose(model, 0.05, windows, scored=scored, group=16, progress=False, log=lambda _: None, min_kept=1.0)
    with pytest.raises(ValueError, match="floor"):
        candidates(model, 0.125, context, scored, min_kept=1.5)


def test_the_allocator_picks_the_best_it_scored_and_leaves_the_model_as_it_was() -> None:
    model = _model()
    windows = torch.cat([_ids(96, seed) for seed in range(2)])
    result = compose(model, 0.25, windows, scored=16, group=16, finalists=2, progress=False, log=lambda _: None)
    assert result.bytes_fraction <= 0.25 + 1e-9
    finals = [r for r in result.candidates if r["windows"] == 2]
    assert len(finals) == 2 and result.perplexity == pytest.approx(min(r["perplexity"] for r in finals), rel=1e-4)
    windowed = [r for r in result.candidates if r["window"]]
    assert windowed and all(r["key_bits"] < 16 for r in windowed)
    assert any(r["window"] == 16 for r in windowed)  # default: the scored tokens
    filled = [r for r in windowed if r["window"] != 16]  # every token kept, the spare bytes' newest tokens at bf16
    assert all(r["window"] >= 16 and "all tokens" in r["composition"] for r in filled)
    assert all(r["bytes_fraction"] <= 0.25 + 1e-9 for r in result.candidates)
    plain = compose(model, 0.25, windows, scored=16, group=16, finalists=2, progress=False, log=lambda _: None,
                    recent_window=0)
    assert not [r for r in plain.candidates if r["window"]]
    assert model.kv_budget() == 1.0 and model.get_kv_bits() is None and model.get_kv_eviction() is None


def test_a_composition_file_round_trips_through_every_loader(tmp_path: Path) -> None:
    base, text = tmp_path / "base", tmp_path / "text.txt"
    save_tiny_base(make_tiny_llama("gqa", attn_implementation="sdpa"), base, text, words=2000)
    out = tmp_path / "pca"
    assert main(["calibrate", "--model", str(base), "--out", str(out), "--data", str(text),
                 "--seq-len", "32", "--tokens", "256", "--batch-size", "2"]) == 0
    comp = tmp_path / "comp.json"
    assert main(["search-budget", "--model", str(out), "--bytes", "0.25", "--context", "96", "--score-last", "16",
                 "--windows", "1", "--group", "16", "--bits", "16,4", "--data", str(text), "--out", str(comp)]) == 0
    data = json.loads(comp.read_text())
    assert data["context"] == 96 and data["bytes_fraction"] <= 0.25 and len(data["eviction"]["layer_ratios"]) == 2
    for bad in ("half", "1.5"):  # not a number, not a share of head_dim: one error line, no file
        assert main(["search-budget", "--model", str(out), "--bytes", "0.25", "--context", "96", "--score-last", "16",
                     "--windows", "1", "--group", "16", "--bits", "16,4", "--data", str(text), "--value-ranks", bad,
                     "--out", str(tmp_path / "bad.json")]) == 2
        assert not (tmp_path / "bad.json").exists()

    from transformers import AutoModelForCausalLM

    for model in (AutoModelForCausalLM.from_pretrained(out, kv_rank_file=str(comp)),
                  _loaded(out, comp)):
        assert model.get_kv_ranks()["key"] == data["key"] and model.get_kv_ranks()["value"] == data["value"]
        bits = model.get_kv_bits()
        if data["key_bits"][0][0] == 16 and data["value_bits"][0][0] == 16:
            assert bits is None or bits.is_identity()
        else:
            assert [list(r) for r in bits.key_bits] == data["key_bits"]
            assert bits.residual == data["quant_residual"]
        press = model.get_kv_eviction()
        if any(data["eviction"]["layer_ratios"]):
            assert list(press.layer_ratios) == pytest.approx(data["eviction"]["layer_ratios"])
        model.set_kv_eviction(None)
        assert model.get_kv_eviction() is None
    assert main(["eval", "--model", str(out), "--budgets", "1", "--rank-file", str(comp), "--context", "96",
                 "--score-last", "16", "--windows", "1", "--data", str(text),
                 "--out", str(tmp_path / "ev")]) == 0


@pytest.mark.parametrize("residual", [0, 24])
def test_the_least_eviction_holds_the_budget_in_a_real_cache(residual: int) -> None:
    """`least_eviction` (4 bits x eviction's share in the benchmarks): after a real prefill and read, the cache holds
    at most the budget with its uncoded tokens at bf16, and one token more per layer would not fit; a budget the
    read tokens alone exceed is one clear error."""
    model = _model()
    model.set_kv_bits(4, 4, group=16, residual=residual)
    context, scored = 96, 16
    full = model.full_cache_bytes_per_token(torch.bfloat16) * context
    for budget in (0.25, 0.2):
        ratio = least_eviction(model, budget, context, scored)
        cache = model.model.new_cache()
        with SnapEviction(ratio)(model):
            model(input_ids=_ids(context)[:, :context - scored], past_key_values=cache, use_cache=True)
        model(input_ids=_ids(context)[:, context - scored:], past_key_values=cache, use_cache=True)
        assert held_bytes(model, cache) / full <= budget + 1e-9
        kept = cache.layers[0].get_seq_length() - scored
        assert 0 < ratio and kept == SnapEviction(ratio).kept(context - scored)
        one_more = SnapEviction(1 - (kept + 1.5) / (context - scored))
        assert one_more.kept(context - scored) == kept + 1
        rates = [r / (full / context / 2) for r in layer_rates(model)]
        bf16 = [1.0, 1.0]
        assert formula_bytes(one_more, rates, positions_share(model), context, scored, bf16, residual, 16) > budget
    with pytest.raises(ValueError, match="kept whole already"):
        least_eviction(model, 0.05, context, scored)


def test_a_window_of_newest_tokens_round_trips_through_the_rank_file(tmp_path: Path) -> None:
    """A pick holding its newest tokens at bf16 writes the window; loading the file sets the quantized cache's
    full-precision window, and a fresh cache then holds that many tokens uncoded."""
    from plugin.budgets.composition import CompositionResult
    from plugin.budgets.ranks import write_rank_file

    model = _model()
    best = Composition(0.75, 4, 4, (0.25, 0.25), "uniform", window=24)
    best.apply(model, 16)
    result = CompositionResult(best, model.get_kv_ranks(), 0.3, 2.0, 1.9, 96, 16, 16)
    path = tmp_path / "comp.json"
    write_rank_file(path, result.ranks, 16, **result.file_fields(2, 2))
    assert json.loads(path.read_text())["quant_residual"] == 24
    fresh = _model()
    fresh.load_rank_file(path)
    assert fresh.get_kv_bits().residual == 24 and fresh.get_kv_bits().group == 16
    cache = fresh.model.new_cache()
    with torch.no_grad():
        fresh(input_ids=_ids(96), past_key_values=cache, use_cache=True)
    assert [layer.uncoded_tokens() for layer in cache.layers] == [tail_tokens(72, 24, 16)] * 2  # 0.25 of 96 evicted


def _loaded(path: Path, comp: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.load_rank_file(comp)
    return model


def test_a_malformed_eviction_entry_is_refused_before_anything_changes(tmp_path: Path) -> None:
    model = _model()
    ranks = model.get_kv_ranks()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**ranks, "head_dim": 16, "eviction": {"layer_ratios": [0.5]}}))
    with pytest.raises(ValueError, match="one evicted share per layer"):
        model.load_rank_file(bad)
    bad.write_text(json.dumps({**ranks, "head_dim": 16, "eviction": {"layer_ratios": [0.5, 1.5]}}))
    with pytest.raises(ValueError, match=r"bad.json: .*\[0, 1\)"):
        model.load_rank_file(bad)
    assert model.get_kv_eviction() is None


def test_composition_labels_say_what_they_hold() -> None:
    assert Composition(0.5, 4, 2, (0.5, 0.25), "pyramid").label() == (
        "ranks 0.5 x 4/2 bits x 0.625 of the prompt (pyramid)")
    assert Composition(1.0, 16, 16, (0.0, 0.0), "uniform").label() == "ranks 1 x 16 bits x all tokens"
    assert Composition(1.0, 4, 4, (0.0, 0.0), "uniform", window=512).label() == (
        "ranks 1 x 4 bits x all tokens + the newest 512 at bf16")


def _uneven_table(model) -> dict:
    """Per-head ranks of mean 0.75 on the tiny model (head_dim 16, step 2): layer 0 cut deep, layer 1 barely."""
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 16)
    return {"key": [[8, 10], [14, 16]], "value": [[10, 12], [16, 10]]}


@pytest.mark.parametrize("key_space", KEY_SPACES)
def test_per_head_tables_fill_the_budget_and_the_cache_holds_what_they_say(key_space: str) -> None:
    """A per-head rank table joins at the kept share that fills the budget, at every bit width; the bytes read from
    a real cache (each layer at its own rate) stay within the budget, and unquantized they equal the buffers."""
    model = _model(key_space)
    table = _uneven_table(model)
    window = _ids(96)[0]
    for budget in (0.5, 0.25, 0.125):
        tabled = [o for o in candidates(model, budget, 96, 16, group=16, head_tables=[table]) if o.head_ranks]
        assert {(o.key_bits, o.value_bits) for o in tabled} >= {(4, 4), (8, 8)}
        assert all(o.rank_budget == pytest.approx(0.75) for o in tabled)
        for option in tabled:
            _, used = window_nll(model, option, window, 16, group=16)
            assert used <= budget + 1e-9, (option.label(), used)
            assert used >= 0.9 * budget or not any(option.layer_ratios), (option.label(), used)  # fills it
            assert model.get_kv_ranks() == table
            if (option.key_bits, option.value_bits) == (16, 16):
                cache = model.model.new_cache()
                with option.press()(model) if option.press() else torch.no_grad():
                    model(input_ids=window[None, :80], past_key_values=cache, use_cache=True)
                live = cache.live_nbytes() - cache._position_bytes()
                assert held_bytes(model, cache) - cache._position_bytes() == pytest.approx(live / 2)  # fp32 -> bf16
    assert not [o for o in candidates(model, 0.25, 96, 16, group=16) if o.head_ranks]  # none without tables


def test_held_bytes_count_each_layer_at_its_own_ranks() -> None:
    """Layers of different ranks holding different token counts (a pyramid): each at its own rate."""
    model = _model()
    model.set_kv_ranks(_uneven_table(model))
    cache = model.model.new_cache()
    with SnapEviction(0.5, window=8, layer_ratios=(0.25, 0.75))(model):
        model(input_ids=_ids(80), past_key_values=cache, use_cache=True)
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths == [60, 20]
    expected = (60 * (8 + 10 + 10 + 12) + 20 * (14 + 16 + 16 + 10)) * 2  # bf16 bytes
    assert held_bytes(model, cache) - cache._position_bytes() == pytest.approx(expected)
    model.set_kv_bits(4, 4, group=16)
    cache = model.model.new_cache()
    with SnapEviction(0.5, window=8, layer_ratios=(0.25, 0.75))(model):
        model(input_ids=_ids(80), past_key_values=cache, use_cache=True)
    rate = [sum(r * 4 / 8 + 4 * r / 16 for r in k) + sum(r * 4 / 8 + 4 for r in v)
            for k, v in zip(_uneven_table(model)["key"], _uneven_table(model)["value"])]
    bf16 = [(8 + 10 + 10 + 12) * 2, (14 + 16 + 16 + 10) * 2]
    # whole blocks of 16 are codes; the 12 and 4 tokens of a block not yet full are held uncoded, paid at bf16
    assert [layer.uncoded_tokens() for layer in cache.layers] == [12, 4]
    assert held_bytes(model, cache) - cache._position_bytes() == pytest.approx(
        48 * rate[0] + 12 * bf16[0] + 16 * rate[1] + 4 * bf16[1])
    assert held_bytes(model, cache) - cache._position_bytes() == pytest.approx(_buffers_at_bf16(cache))


def _buffers_at_bf16(cache) -> float:
    """The bytes a quantized cache's buffers hold (codes, float16 scales and zeros), its fp32 uncoded tokens
    counted at bf16, stored positions left out."""
    streams = [stream for layer in cache.layers for stream in layer.streams()]
    return sum(stream.nbytes() - 2 * (stream.tail.numel() if stream.tail is not None else 0) for stream in streams)


@pytest.mark.parametrize("window", [0, 8, 40])
def test_a_window_of_newest_tokens_is_paid_at_bf16_and_the_formula_says_so(window: int) -> None:
    """With the newest `window` tokens held unquantized, the bytes read from the cache after a real prefill and
    read equal the buffers (at bf16) and the formula, evicting or not."""
    model = _model()
    context, scored, group = 96, 16, 16
    for ratios in ((0.0, 0.0), (0.25, 0.75)):
        model.set_kv_budget(0.75)
        model.set_kv_bits(4, 2, group=group, residual=window)
        option = Composition(0.75, 4, 2, ratios, "uniform", window=window)
        _, used = window_nll(model, option, _ids(context)[0], scored, group)
        cache = model.model.new_cache()
        with option.press()(model) if option.press() else torch.no_grad():
            model(input_ids=_ids(context)[:, :context - scored], past_key_values=cache, use_cache=True)
        model(input_ids=_ids(context)[:, context - scored:], past_key_values=cache, use_cache=True)
        held = [layer.get_seq_length() for layer in cache.layers]
        assert [layer.uncoded_tokens() for layer in cache.layers] == [tail_tokens(n, window, group) for n in held]
        assert held_bytes(model, cache) - cache._position_bytes() == pytest.approx(_buffers_at_bf16(cache))
        full = model.full_cache_bytes_per_token(torch.bfloat16) * context
        assert used == pytest.approx(held_bytes(model, cache) / full)
        rates = composition_rates(option, 16, 2, group)
        full_rates = composition_rates(option, 16, 2, group, (16, 16))
        assert formula_bytes(option.press(), rates, positions_share(model), context, scored, full_rates, window,
                             group) == pytest.approx(used)


def test_the_allocator_can_pick_a_per_head_table_and_writes_it(tmp_path: Path) -> None:
    """With a table among the candidates, the search scores it and, when it wins, the file carries its ranks."""
    model = _model()
    table = _uneven_table(model)
    windows = torch.cat([_ids(96, seed) for seed in range(2)])
    result = compose(model, 0.25, windows, scored=16, group=16, finalists=40, progress=False, log=lambda _: None,
                     head_tables=[table], profiles=("uniform",))
    rows = [r for r in result.candidates if "per head" in r["composition"]]
    assert rows and all(r["bytes_fraction"] <= 0.25 + 1e-9 for r in rows)
    # each per-head row is the perplexity of its own cache: scored again by hand, the same number
    options = {o.label(): o for window in (0, 16)  # the best few are also tried with the newest 16 at bf16
               for o in candidates(model, 0.25, 96, 16, group=16, head_tables=[table], profiles=("uniform",),
                                   window=window) if o.head_ranks}
    frame = ByteFrame(0.25, 96, 16, 16, positions_share(model))  # and those keeping every token, filled
    options.update({o.label(): o for o in (_filled_of(o, model, frame) for o in list(options.values())
                                           if not any(o.layer_ratios) and not o.window) if o is not None})
    for row in rows:
        nll = torch.cat([window_nll(model, options[row["composition"]], w, 16, 16)[0] for w in windows])
        assert row["perplexity"] == pytest.approx(float(torch.exp(nll.mean())), rel=1e-4)
    best_row = min(result.candidates, key=lambda r: (r["windows"] != 2, r["perplexity"]))
    assert best_row["composition"] == result.best.label()
    if result.best.head_ranks is not None:
        assert result.ranks == table
    labelled = Composition(0.75, 4, 4, (0.5, 0.5), "uniform", ((tuple(table["key"][0]), tuple(table["key"][1])),
                                                               (tuple(table["value"][0]), tuple(table["value"][1]))))
    assert labelled.label() == "ranks 0.75 per head x 4 bits x 0.5 of the prompt (uniform)"
    labelled.apply(model, 16)
    assert model.get_kv_ranks() == table


def test_head_ranks_of_another_model_or_without_context_are_refused(capsys) -> None:
    model = _model()
    with pytest.raises(ValueError, match="layers"):
        candidates(model, 0.25, 96, 16, group=16, head_tables=[{"key": [[8, 8]], "value": [[8, 8]]}])
    assert main(["search-budget", "--model", "embedded", "--bytes", "0.25", "--head-ranks", "x.json"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mkv: error:") and "--head-ranks" in last and "--context" in last


def test_per_head_tables_are_tried_at_the_bit_widths_of_the_best_uniform_compositions() -> None:
    """The tables cost one window each at the widths that won the first round, not at every width."""
    model = _model()
    table = _uneven_table(model)
    windows = _ids(96)
    result = compose(model, 0.25, windows, scored=16, group=16, finalists=1, progress=False, log=lambda _: None,
                     head_tables=[table], profiles=("uniform",))
    uniform = [r for r in result.candidates if "per head" not in r["composition"]]
    tabled = [r for r in result.candidates if "per head" in r["composition"]]
    best_uniform = min(uniform, key=lambda r: r["perplexity"])
    assert tabled and {(r["key_bits"], r["value_bits"]) for r in tabled} == {
        (best_uniform["key_bits"], best_uniform["value_bits"])}


def test_pyramids_over_per_head_ranks_are_checked_by_the_formula_before_scoring() -> None:
    """A pyramid keeps the mean kept share; where the lower layers hold more dims per token it holds more bytes than
    the budget. The formula says so (and the real cache agrees), so the search never spends a window on it."""
    model = _model()
    uneven = _uneven_table(model)
    table = {"key": uneven["key"][::-1], "value": uneven["value"][::-1]}  # layer 0 the wide one
    option = next(o for o in candidates(model, 0.25, 96, 16, group=16, head_tables=[table], tables_only=True,
                                        profiles=("uniform",)) if any(o.layer_ratios))
    mean = sum(option.layer_ratios) / 2
    pyramid = Composition(option.rank_budget, option.key_bits, option.value_bits,
                          SnapEviction.pyramid(mean, 2, 0.5).layer_ratios, "pyramid", option.head_ranks)
    position = POSITION_BYTES / (4 * model.config.head_dim)  # pre-RoPE keys store their positions
    assert positions_share(model) == position
    assert formula_bytes(pyramid.press(), composition_rates(pyramid, 16, 2, 16), position, 96, 16) > 0.25
    assert _pyramid_of(option, model, ByteFrame(0.25, 96, 16, 16, position)) is None  # refused before any window
    assert _pyramid_of(option, model, ByteFrame(0.5, 96, 16, 16, position)).layer_ratios == pyramid.layer_ratios
    assert window_nll(model, pyramid, _ids(96)[0], 16, 16)[1] > 0.25  # the real cache holds as much
    lines: list[str] = []
    result = compose(model, 0.25, _ids(96), scored=16, group=16, finalists=40, progress=False, log=lines.append,
                     head_tables=[table])
    assert not [line for line in lines if "left out" in line], lines
    assert all(row["bytes_fraction"] <= 0.25 + 1e-9 for row in result.candidates)
    assert pyramid.label() not in {row["composition"] for row in result.candidates}


def test_a_composition_keeping_every_token_spends_its_spare_bytes_on_newest_tokens_at_bf16() -> None:
    """The filled variant holds the largest window of newest tokens at bf16 that fits: one more block does not, the
    real cache holds what the formula says, within the budget; with no block's worth of bytes to spare, none."""
    model, context, scored, group = _model(), 96, 16, 16
    frame = ByteFrame(0.5, context, scored, group, positions_share(model))
    option = Composition(1.0, 4, 4, (0.0, 0.0), "uniform")
    filled = _filled_of(option, model, frame)
    assert filled is not None and filled.window >= group and not any(filled.layer_ratios)
    rates, full_rates = _option_rates(filled, model, group)
    assert frame.fits(None, rates, full_rates, filled.window)
    assert not frame.fits(None, rates, full_rates, filled.window + group)
    _, used = window_nll(model, filled, _ids(context)[0], scored, group)
    assert used <= 0.5 + 1e-9
    assert used == pytest.approx(frame.bytes(None, rates, full_rates, filled.window), rel=1e-6)
    tight = ByteFrame(frame.bytes(None, rates, full_rates, 0) + 1e-6, context, scored, group, positions_share(model))
    assert _filled_of(option, model, tight) is None
    assert _filled_of(option, model, ByteFrame(0.05, context, scored, group, positions_share(model))) is None


def test_value_cuts_keep_keys_whole_and_are_tried_at_the_best_uniform_bit_width() -> None:
    """Keys at full rank, values cut on the grid: scored at the bit width of the best uniform composition, labelled
    as a split (not per head), held within the budget by the real cache; none with `value_ranks=()`."""
    model = _model()
    d = model.config.head_dim
    cut = value_cut(model, 0.5)
    assert cut == {"key": [[d, d], [d, d]], "value": [[d // 2, d // 2], [d // 2, d // 2]]}
    with pytest.raises(ValueError, match="value rank"):
        value_cut(model, 1.5)
    windows = _ids(96)
    kwargs = {"scored": 16, "group": 16, "finalists": 1, "progress": False, "log": lambda _: None,
              "profiles": ("uniform",)}
    result = compose(model, 0.25, windows, value_ranks=(0.5,), **kwargs)
    split = [r for r in result.candidates if f"(keys {d}, values {d // 2} dims)" in r["composition"]]
    uniform = [r for r in result.candidates if "dims)" not in r["composition"] and not r["window"]]
    best_uniform = min(uniform, key=lambda r: r["perplexity"])
    assert split and all(r["rank_budget"] == 0.75 and r["bytes_fraction"] <= 0.25 + 1e-9 for r in split)
    assert {(r["key_bits"], r["value_bits"]) for r in split} == {(best_uniform["key_bits"], best_uniform["value_bits"])}
    plain = compose(model, 0.25, windows, value_ranks=(), **kwargs)
    assert not [r for r in plain.candidates if "dims)" in r["composition"]]


def test_the_best_of_each_kind_of_ranks_meets_the_rest_on_every_window() -> None:
    """Where the first window ranks one kind of ranks on top, the best `count` of every other kind still reach the
    final round: an optional kind never pushes out what the search without it would have scored there."""
    key, half = ((16, 16), (16, 16)), ((8, 8), (8, 8))
    split = [Composition(0.75, 4, 4, (0.0, 0.0), "uniform", (key, half), window=w) for w in (0, 64, 128)]
    uniform = [Composition(1.0, 4, 4, (r, r), "uniform") for r in (0.2, 0.4)]
    per_head = Composition(0.75, 4, 4, (0.0, 0.0), "uniform", (((16, 8), (16, 8)), half))
    assert [o.ranks_kind() for o in (split[0], uniform[0], per_head)] == ["split", "uniform", "per head"]
    ranked = [*split, uniform[0], per_head, uniform[1]]
    assert _finalists(ranked, 2) == [split[0], split[1], uniform[0], per_head, uniform[1]]
    assert _finalists(ranked, 1) == [split[0], uniform[0], per_head]
    assert _finalists([o for o in ranked if o.ranks_kind() == "uniform"], 1) == [uniform[0]]
    assert split[0].label() == "ranks 0.75 (keys 16, values 8 dims) x 4 bits x all tokens"
