"""Greedy per-head budget search (plugin.budgets.greedy_search, `mkv search-budget`) on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from plugin.budgets.greedy_search import choose_mode, exact_cost, run_search, run_search_many, search_budget
from plugin.budgets.ranks import read_rank_file, write_rank_file
from plugin.model.modeling import PcaLlamaForCausalLM

HEAD_DIM = 8
LAYERS = 3


def tiny_pca(kv_heads: int, seed: int = 0, attn: str = "sdpa") -> PcaLlamaForCausalLM:
    """float64 tiny PcaLlama with random orthogonal bases and value means (float64: no near-ties)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, attn_implementation=attn,
    )
    base = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # sharper attention than the default init, so that key ranks matter too
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    shape = (LAYERS, kv_heads, HEAD_DIM, HEAD_DIM)
    key_bases = torch.linalg.qr(torch.randn(shape, dtype=torch.float64))[0]
    value_bases = torch.linalg.qr(torch.randn(shape, dtype=torch.float64))[0]
    means = 0.1 * torch.randn(LAYERS, kv_heads, HEAD_DIM)
    return PcaLlamaForCausalLM.from_llama(base, key_bases, value_bases, means)


def windows(n: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def brute_force_greedy(model: PcaLlamaForCausalLM, budget: float, data: torch.Tensor, step: int) -> dict:
    """Independent reference: a full model forward per candidate, the paper's loop as written."""
    cfg = model.config
    n_layers, n_heads, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    model.eval()
    model.set_kv_budget(1.0)
    base = torch.log_softmax(model(input_ids=data, use_cache=False).logits, dim=-1)

    def kl(table: dict) -> float:
        model.set_kv_ranks(table)
        logq = torch.log_softmax(model(input_ids=data, use_cache=False).logits, dim=-1)
        return float((base.exp() * (base - logq)).sum(-1).mean())

    table = {"key": [[d] * n_heads for _ in range(n_layers)], "value": [[d] * n_heads for _ in range(n_layers)]}
    total = lambda t: sum(sum(row) for kind in ("key", "value") for row in t[kind])
    while total(table) / (2 * n_layers * n_heads * d) > budget + 1e-12:
        best = None
        for kind in ("key", "value"):
            for layer in range(n_layers):
                for head in range(n_heads):
                    if table[kind][layer][head] <= step:
                        continue
                    trial = json.loads(json.dumps(table))
                    trial[kind][layer][head] -= step
                    score = kl(trial)
                    if best is None or score < best[0]:
                        best = (score, trial)
        table = best[1]
    model.set_kv_budget(1.0)
    return table


@pytest.mark.parametrize("kv_heads,attn,budget", [(4, "sdpa", 0.75), (2, "eager", 0.5)])
def test_exact_equals_brute_force(kv_heads: int, attn: str, budget: float) -> None:
    model = tiny_pca(kv_heads, attn=attn)
    data = windows()
    expected = brute_force_greedy(model, budget, data, step=2)
    for batch, reuse in ((1, True), (64, True), (4, False)):
        ranks = search_budget(model, budget, data, step=2, batch_candidates=batch, reuse_prefix=reuse, progress=False)
        assert ranks == expected, (batch, reuse)


def test_budget_lands_on_grid_and_kl_matches_model() -> None:
    model = tiny_pca(2)
    data = windows()
    n_entries = 2 * LAYERS * 2
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=data, use_cache=False).logits, dim=-1)
    for target, step in ((0.8, 2), (0.5, 2), (0.3, 2), (0.6, 4), (0.5, 1)):
        for mode in ("exact", "fast"):
            result = run_search(model, target, data, step=step, mode=mode, progress=False)
            values = [r for kind in ("key", "value") for row in result.ranks[kind] for r in row]
            assert all(r % step == 0 and step <= r <= HEAD_DIM for r in values)
            grid_sum = int(target * n_entries * HEAD_DIM // step) * step  # largest grid sum not above target
            assert sum(values) == grid_sum and result.budget <= target
            assert result.budget == pytest.approx(grid_sum / (n_entries * HEAD_DIM))
            # The KL reported by the layer-by-layer evaluator is the model's own KL at those ranks.
            model.set_kv_ranks(result.ranks)
            with torch.no_grad():
                logq = torch.log_softmax(model(input_ids=data, use_cache=False).logits, dim=-1)
            model.set_kv_budget(1.0)
            assert result.kl == pytest.approx(float((base.exp() * (base - logq)).sum(-1).mean()), rel=1e-6, abs=1e-12)


def test_sweep_equals_single_searches_and_fast_is_cheaper() -> None:
    model = tiny_pca(2, seed=3)
    data = windows(seed=4)
    sweep = run_search_many(model, [0.75, 0.375], data, step=2, progress=False)
    for result in sweep:
        assert result.ranks == search_budget(model, result.target, data, step=2, progress=False)
    fast = run_search_many(model, [0.75, 0.375], data, step=2, mode="fast", fraction=0.5, progress=False)
    assert [f.budget for f in fast] == [s.budget for s in sweep]
    assert fast[-1].rounds < sweep[-1].rounds
    assert fast[0].ranks == run_search(model, 0.75, data, step=2, mode="fast", fraction=0.5, progress=False).ranks


def test_full_budget_and_state_restored() -> None:
    model = tiny_pca(2)
    model.set_kv_budget(0.5)
    before = (model.get_kv_ranks(), dict(model.config.kv_ranks))
    model.train()
    result = run_search(model, 1.0, windows(), step=2, progress=False)
    assert result.rounds == 0 and result.kl == 0.0 and result.budget == 1.0
    run_search(model, 0.75, windows(), step=2, progress=False)
    assert (model.get_kv_ranks(), dict(model.config.kv_ranks)) == before
    assert model.training


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 0.0}, "outside"),
        ({"budget": 1.5}, "outside"),
        ({"budget": float("nan")}, "outside"),
        ({"budget": "half"}, "not a number"),
        ({"budget": 0.5, "step": 3}, "dividing head_dim"),
        ({"budget": 0.1, "step": 2}, "smallest reachable"),
        ({"budget": 0.5, "mode": "lazy"}, "not one of"),
        ({"budget": 0.5, "fraction": 0.0}, "fraction"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    model = tiny_pca(2)
    budget = kwargs.pop("budget")
    with pytest.raises(ValueError, match=match):
        run_search(model, budget, windows(), progress=False, **kwargs)


def test_bad_windows() -> None:
    model = tiny_pca(2)
    with pytest.raises(ValueError, match="LongTensor"):
        run_search(model, 0.5, torch.zeros(5, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="outside"):
        run_search(model, 0.5, torch.full((1, 4), 64), progress=False)


def test_plain_llama_is_wrapped_with_warning() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="identity"):
        ranks = search_budget(base, 0.75, windows(), step=4, progress=False)
    assert len(ranks["key"]) == 2 and len(ranks["key"][0]) == 2


def test_rank_file_round_trip(tmp_path) -> None:
    model = tiny_pca(2)
    result = run_search(model, 0.5, windows(), step=2, progress=False)
    path = write_rank_file(tmp_path / "ranks.json", result.ranks, HEAD_DIM, **result.summary())
    assert read_rank_file(path, LAYERS, 2, HEAD_DIM) == result.ranks
    model.load_rank_file(path)
    assert model.get_kv_ranks() == result.ranks
    assert model.kv_budget() == pytest.approx(result.budget)


def _char_tokenizer(path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz .,"
    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def test_cli_writes_rank_files(tmp_path, capsys) -> None:
    from plugin.cli import main

    model = tiny_pca(2).float()
    model.save_pretrained(tmp_path / "model")
    _char_tokenizer(tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, again and again. " * 20)
    out = tmp_path / "r-{budget}.json"
    argv = ["search-budget", "--model", str(tmp_path / "model"), "--budget", "0.75,0.5", "--step", "2",
            "--samples", "2", "--seq-len", "12", "--data", str(text), "--mode", "fast", "--out", str(out)]
    assert main(argv) == 0
    for budget in ("0.75", "0.5"):
        payload = json.loads((tmp_path / f"r-{budget}.json").read_text())
        assert payload["budget"] == float(budget) and payload["mode"] == "fast"
        model.load_rank_file(tmp_path / f"r-{budget}.json")
        assert model.kv_budget() == float(budget)
    out = capsys.readouterr().out
    assert "mkv eval" in out and "an exact search to 0.5 takes about 24 rounds" in out and "in fast mode" in out
    assert main(argv[:3] + ["--budget", "0.5", "--step", "3"]) == 2
    assert main(argv[:3] + ["--budget", "0.5,0.25", "--out", str(tmp_path / "one.json")]) == 2
    assert "must contain {budget}" in capsys.readouterr().err


@pytest.mark.parametrize("budget", [0.75, 0.5, 0.25])
def test_exact_cost_estimate_bounds_a_real_exact_search(budget: float) -> None:
    """Rounds are exact; the candidate count assumes even lowering, an upper bound (fewer entries at the floor)."""
    model = tiny_pca(2)
    cfg = model.config
    result = run_search(model, budget, windows(), step=2, mode="exact", progress=False)
    rounds, evaluations = exact_cost(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 2, budget)
    assert result.rounds == rounds
    entries = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads
    assert rounds * entries * 0.5 < result.evaluations <= evaluations <= rounds * entries


def test_auto_mode_is_exact_when_affordable_and_fast_at_7b_scale() -> None:
    assert exact_cost(30, 3, 64, 8, 0.375) == (900, 162000)  # the embedded SmolLM2-135M
    rounds, evaluations = exact_cost(32, 32, 128, 16, 0.375)  # Llama-2-7B
    assert rounds == 10240 and evaluations > 2e7
    assert choose_mode("auto", 162000) == "exact" and choose_mode("auto", evaluations) == "fast"
    assert choose_mode("exact", evaluations) == "exact"
    with pytest.raises(ValueError, match="auto"):
        choose_mode("slow", 1)
