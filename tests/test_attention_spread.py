"""Kept tokens spread over the layers by each layer's own attention (plugin.budgets.attention_spread)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import to_pca

from plugin import SnapEviction
from plugin.budgets.attention_spread import AttentionCurves, attention_ratios, attention_spread
from plugin.budgets.cache_bytes import ByteFrame, keeps_floor, positions_share
from plugin.budgets.composition import SPREADS, _attention_of, _option_rates, compose, window_nll
from plugin.budgets.composition_grid import Composition


def _model():
    return to_pca(make_tiny_llama("gqa", attn_implementation="sdpa"), key_space="pre-rope")


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _density(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_a_layer_whose_attention_is_spread_keeps_more_and_the_total_is_kept() -> None:
    spread = [0.08] * 10  # mass over every earlier token alike
    sharp = [0.5, 0.2] + [0.01] * 8  # two tokens catch most of it
    counts = attention_spread(_density([spread, sharp]), [4, 4])
    assert sum(counts) == 8
    assert counts[0] > counts[1] >= 2


def test_the_floor_is_kept_by_every_layer_first() -> None:
    counts = attention_spread(_density([[0.08] * 10, [0.9] + [0.0] * 9]), [5, 5], floor=3)
    assert sum(counts) == 10 and min(counts) >= 3
    with pytest.raises(ValueError, match="do not fit"):
        attention_spread(_density([[0.1] * 4, [0.1] * 4]), [1, 1], floor=2)
    with pytest.raises(ValueError, match="kept counts for 2 layers"):
        attention_spread(_density([[0.1] * 4, [0.1] * 4]), [1, 1, 1])


def test_curves_are_recorded_at_prefills_only_and_the_hooks_always_leave() -> None:
    model = _model()
    curves = AttentionCurves(SnapEviction(0.5, window=8))
    with curves.recording(model):
        model(input_ids=_ids(40), past_key_values=model.model.new_cache(), use_cache=True)
        model(input_ids=_ids(40, 1), past_key_values=model.model.new_cache(), use_cache=True)
    density = curves.density()
    assert density.shape == (model.config.num_hidden_layers, 32)
    assert bool((density[:, :-1] >= density[:, 1:] - 1e-7).all())  # sorted, best first
    assert float(density.sum(dim=1).max()) <= 1.0 + 1e-5  # a share of each query's softmax
    assert all(not attn.kv_hooks() for attn in model.attention_layers())
    with pytest.raises(RuntimeError), curves.recording(model):
        raise RuntimeError("a failed read")
    assert all(not attn.kv_hooks() for attn in model.attention_layers())
    empty = AttentionCurves()
    with pytest.raises(ValueError, match="no prefill was recorded"):
        empty.density()


@pytest.mark.parametrize("budget", [0.3, 0.2])
def test_an_attention_spread_spends_the_bytes_of_the_even_one_and_a_real_cache_holds_them(budget: float) -> None:
    model = _model()
    context, scored, group, observed = 96, 16, 16, 8
    prompt = context - scored
    curves = AttentionCurves(SnapEviction(0.5, window=observed))
    with curves.recording(model):
        for seed in range(2):
            model(input_ids=_ids(prompt, seed), past_key_values=model.model.new_cache(), use_cache=True)
    frame = ByteFrame(budget, context, scored, group, positions_share(model))
    layers = model.config.num_hidden_layers
    even = Composition(1.0, 4, 4, (0.0,) * layers, "uniform")
    rates, full_rates = _option_rates(even, model, group)
    ratio = frame.least_ratio(rates, full_rates, 0)
    even = Composition(1.0, 4, 4, (ratio,) * layers, "uniform")
    ratios = attention_ratios(curves.density(), even.layer_ratios, frame, rates, full_rates, 0, observed)
    assert ratios is not None and frame.fits(ratios, rates, full_rates, 0)
    press = SnapEviction(max(ratios), window=observed, layer_ratios=ratios)
    kept = [press.kept(prompt, layer) for layer in range(layers)]
    even_kept = sum(SnapEviction(ratio).kept(prompt) for _ in range(layers))
    assert sum(kept) >= even_kept - layers * group  # the same bytes, give or take each layer's unfilled block
    spread = _attention_of(even, model, frame, curves.density(), observed)
    assert spread is not None and spread.profile == "attention" and spread.layer_ratios == ratios
    nll, used = window_nll(model, spread, _ids(context, 5)[0], scored, group)
    assert used <= budget + 1e-9 and torch.isfinite(nll).all()


def test_the_search_scores_attention_spreads_and_only_when_asked() -> None:
    model = _model()
    windows = torch.cat([_ids(224, seed) for seed in range(2)])  # prompts longer than the 64-token observation
    kwargs = {"scored": 16, "group": 16, "finalists": 2, "progress": False, "log": lambda _: None, "recent_window": 0}
    result = compose(model, 0.2, windows, profiles=SPREADS, **kwargs)
    spreads = [r for r in result.candidates if r["profile"] == "attention"]
    assert spreads and all(r["bytes_fraction"] <= 0.2 + 1e-9 for r in spreads)
    plain = compose(model, 0.2, windows, **kwargs)  # by default: even and pyramid spreads
    assert not [r for r in plain.candidates if r["profile"] == "attention"]
    assert model.get_kv_eviction() is None and all(not attn.kv_hooks() for attn in model.attention_layers())


def test_nothing_is_spread_where_a_layer_keeps_no_more_than_the_observation_window() -> None:
    frame = ByteFrame(0.5, 96, 16, 16, 0.0)
    density = torch.full((2, 72), 1 / 80)
    assert attention_ratios(density, (0.95, 0.95), frame, [0.3, 0.3], [1.0, 1.0], 0, 8) is None  # keeps 4 of 80
    with pytest.raises(ValueError, match="do not match"):
        attention_ratios(density, (0.5, 0.5), frame, [0.3, 0.3], [1.0, 1.0], 0, 16)


def test_search_budget_attention_spread_writes_a_file_every_loader_reads(tmp_path) -> None:
    import json

    from helpers import save_tiny_base
    from transformers import AutoModelForCausalLM

    from plugin.cli import main

    base, text, out, comp = tmp_path / "base", tmp_path / "text.txt", tmp_path / "pca", tmp_path / "comp.json"
    save_tiny_base(make_tiny_llama("gqa", attn_implementation="sdpa"), base, text, words=3000)
    assert main(["calibrate", "--model", str(base), "--out", str(out), "--data", str(text),
                 "--seq-len", "32", "--tokens", "256", "--batch-size", "2"]) == 0
    assert main(["search-budget", "--model", str(out), "--bytes", "0.2", "--context", "224", "--score-last", "16",
                 "--windows", "1", "--group", "16", "--bits", "16,4", "--data", str(text), "--recent-window", "0",
                 "--attention-spread", "--out", str(comp)]) == 0
    data = json.loads(comp.read_text())
    assert [r for r in data["candidates"] if r["profile"] == "attention"] and data["bytes_fraction"] <= 0.2
    model = AutoModelForCausalLM.from_pretrained(out, kv_rank_file=str(comp))
    press = model.get_kv_eviction()
    if any(data["eviction"]["layer_ratios"]):
        assert list(press.layer_ratios) == pytest.approx(data["eviction"]["layer_ratios"])


@pytest.mark.parametrize("min_kept", [0.25, 0.5, 0.77])
def test_every_layer_keeps_the_floor_to_the_token(min_kept: float) -> None:
    prompt, observed = 3584, 64
    frame = ByteFrame(min_kept + 0.1, prompt + 512, 512, 64, 0.0, min_kept=min_kept)  # the sharp layer at its floor
    sharp = torch.zeros(prompt - observed)
    sharp[0] = 0.9  # every token past the first catches nothing: the floor alone keeps this layer's
    density = torch.stack([torch.full((prompt - observed,), 1 / prompt), sharp])
    ratios = attention_ratios(density, (1 - min_kept - 0.05,) * 2, frame, [1.0, 1.0], [1.0, 1.0], 0, observed)
    assert ratios is not None and keeps_floor(ratios, min_kept)
    press = SnapEviction(max(ratios), layer_ratios=ratios)
    assert min(press.kept(prompt, layer) for layer in range(2)) >= min_kept * prompt
