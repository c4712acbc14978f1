"""Ranks x bits under a byte budget: the allocator, its rank files, and their loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from helpers import save_tiny_base, to_pca

from plugin.budgets.rank_bits import allocate, allocate_many, bytes_fraction, parse_choices, rank_budget_for
from plugin.cache import QuantizedPcaCache
from plugin.cli import main


def test_bytes_fraction_and_its_inverse() -> None:
    ranks = {"key": [[8, 8]], "value": [[8, 8]]}
    assert bytes_fraction(ranks, 16, 16, 16, 64) == 0.5
    # 4-bit: per head keys 8*0.5 + 4*8/16 = 6, values 8*0.5 + 4 = 8; bf16 full per head 2*16*2 = 64
    assert bytes_fraction(ranks, 4, 4, 16, 16) == pytest.approx(14 / 64)
    for bits in ((16, 16), (8, 8), (4, 2), (2, 2)):
        budget = rank_budget_for(0.2, *bits, 64, 64)
        r = budget * 64
        assert bytes_fraction({"key": [[r]], "value": [[r]]}, *bits, 64, 64) == pytest.approx(0.2)


def test_parse_choices() -> None:
    assert parse_choices("16, 4/2,2") == [(16, 16), (4, 2), (2, 2)]
    with pytest.raises(ValueError, match="one of 2, 4, 8 or 16"):
        parse_choices("3")
    with pytest.raises(ValueError, match="K or K/V"):
        parse_choices("4/4/4")


def test_allocation_fits_the_budget_and_beats_or_ties_every_candidate() -> None:
    model = to_pca(make_tiny_llama("gqa", attn_implementation="sdpa"))
    windows = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    result = allocate(model, 0.2, windows, group=16, step=4)
    assert result.bytes_fraction <= 0.2 + 1e-9
    assert result.kl == min(c["kl"] for c in result.candidates)
    assert {(c["key_bits"], c["value_bits"]) for c in result.candidates} <= {(16, 16), (8, 8), (4, 4), (4, 2), (2, 2)}
    assert len(result.candidates) >= 3
    assert model.get_kv_bits() is None and model.kv_budget() == 1.0  # the model is left as it was


def test_several_budgets_share_one_descent_and_match_separate_searches() -> None:
    """Exact mode: the greedy path does not depend on the target, so one descent serves every budget."""
    model = to_pca(make_tiny_llama("gqa", attn_implementation="sdpa"))
    windows = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    together = allocate_many(model, [0.3, 0.15], windows, group=16, step=4, mode="exact", progress=False)
    for budget, joint in zip((0.3, 0.15), together):
        alone = allocate(model, budget, windows, group=16, step=4, mode="exact", progress=False)
        assert (joint.ranks, joint.key_bits, joint.value_bits) == (alone.ranks, alone.key_bits, alone.value_bits)
        assert joint.kl == pytest.approx(alone.kl, rel=1e-6) and joint.bytes_fraction <= budget + 1e-9
    assert together[1].bytes_fraction < together[0].bytes_fraction
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        allocate_many(model, [0.3, 1.5], windows)


def test_search_budget_bytes_writes_a_file_that_loads_with_its_bits(tmp_path, capsys) -> None:
    base = make_tiny_llama("gqa")
    save_tiny_base(base, tmp_path / "base", tmp_path / "text.txt")
    assert main(["calibrate", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "text.txt"),
                 "--tokens", "256", "--seq-len", "32", "--out", str(tmp_path / "pca")]) == 0
    out = tmp_path / "alloc.json"
    assert main(["search-budget", "--model", str(tmp_path / "pca"), "--bytes", "0.25", "--group", "16",
                 "--data", str(tmp_path / "text.txt"), "--samples", "2", "--seq-len", "32", "--step", "4",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["bytes_fraction"] <= 0.25 and data["quant_group"] == 16
    from plugin.storage.loading import load_model

    model, _ = load_model(str(tmp_path / "pca"))
    model.load_rank_file(out)
    spec = model.get_kv_bits()
    chosen = (data["key_bits"][0][0], data["value_bits"][0][0])
    if chosen == (16, 16):
        assert spec is None or spec.is_identity()
    else:
        assert isinstance(model.model.new_cache(), QuantizedPcaCache)
        assert spec.key_bits[0][0] == chosen[0] and spec.group == 16
    # mkv eval reads the same file: the row carries the file's bits and bytes
    assert main(["eval", "--model", str(tmp_path / "pca"), "--budgets", "1", "--rank-file", str(out),
                 "--data", str(tmp_path / "text.txt"), "--tokens", "256", "--seq-len", "64",
                 "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads(Path(f"{tmp_path / 'eval'}.json").read_text())["rows"]
    assert rows[0]["kv_bits"] == "16" and rows[1]["bf16_ratio"] == pytest.approx(data["bytes_fraction"], abs=1e-6)


@pytest.mark.parametrize("fields,message", [
    ({"key_bits": [[4, 4]], "value_bits": [[4, 4]] * 2}, r"key_bits must be a \[2\]\[2\] table"),
    ({"key_bits": [[4, 3]] * 2, "value_bits": [[4, 4]] * 2}, "one of 2, 4, 8 or 16"),
    ({"key_bits": [[4, 4]] * 2}, r"value_bits must be a \[2\]\[2\] table"),
    ({"key_bits": [[4, 4]] * 2, "value_bits": [[4, 4]] * 2, "quant_group": 12}, "multiple of 8"),
])
def test_malformed_bits_in_a_rank_file_are_refused_and_change_nothing(tmp_path, fields, message) -> None:
    model = to_pca(make_tiny_llama("gqa"))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"key": [[8, 8]] * 2, "value": [[8, 8]] * 2, **fields}))
    with pytest.raises(ValueError, match=message):
        model.load_rank_file(path)
    assert model.kv_budget() == 1.0 and model.get_kv_bits() is None


def test_search_budget_bytes_refuses_bad_input_before_loading(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("plugin.storage.loading.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for extra, message in ((["--bytes", "1.5"], "outside (0, 1]"), (["--bytes", "0.2", "--bits", "3"], "one of 2, 4"),
                           (["--bytes", "0.2", "--group", "10"], "multiple of 8")):
        assert main(["search-budget", "--model", "embedded", *extra, "--out", str(tmp_path / "a.json")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()
