"""Bad input to `mkv calibrate` / `mkv eval`: refused before any work, one error line, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_llama
from helpers import save_tiny_base
from safetensors.torch import load_file

from plugin.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-inputs")
    save_tiny_base(make_tiny_llama("gqa"), root / "base", root / "text.txt")
    return root / "base", root / "text.txt"


def _calibrate(base: tuple[Path, Path], out: Path, *extra: str) -> int:
    return main(["calibrate", "--model", str(base[0]), "--data", str(base[1]), "--tokens", "256",
                 "--seq-len", "32", "--out", str(out), *extra])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("plugin.storage.loading.load_model", refuse)
    monkeypatch.setattr("plugin.evaluation.perplexity.budget_sweep", refuse)
    monkeypatch.setattr("plugin.evaluation.perplexity.perplexity", refuse)


def test_calibrate_refuses_an_existing_file(base, tmp_path, capsys, monkeypatch) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("the user's file")
    _no_model_loading(monkeypatch)
    assert _calibrate(base, target) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is an existing file" in err
    assert target.read_text() == "the user's file"
    assert _leftovers(tmp_path) == []


def test_calibrate_refuses_a_foreign_non_empty_directory(base, tmp_path, capsys, monkeypatch) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "data.csv").write_text("1,2\n")
    _no_model_loading(monkeypatch)
    for extra in ((), ("--overwrite",)):  # never replaced, not even with --overwrite
        assert _calibrate(base, target, *extra) == 2
        assert "not a checkpoint" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["data.csv"]
    assert _leftovers(tmp_path) == []


def test_calibrate_replaces_a_checkpoint_only_with_overwrite(base, tmp_path, capsys) -> None:
    out = tmp_path / "pca"
    assert _calibrate(base, out) == 0
    first = json.loads((out / "pca_summary.json").read_text())
    assert _calibrate(base, out, "--seq-len", "64") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "pca_summary.json").read_text()) == first
    assert _calibrate(base, out, "--overwrite", "--seq-len", "64") == 0
    assert json.loads((out / "pca_summary.json").read_text())["seq_len"] == 64
    assert _leftovers(tmp_path) == []


def test_calibrate_into_an_empty_directory_and_nothing_pickled(base, tmp_path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert _calibrate(base, out) == 0
    eigenvalues = load_file(str(out / "pca_eigenvalues.safetensors"))
    assert set(eigenvalues) == {"key", "value"} and eigenvalues["key"].shape == (2, 2, 16)
    assert bool((eigenvalues["key"][..., :-1] >= eigenvalues["key"][..., 1:]).all())  # descending
    assert not [p.name for p in out.iterdir() if p.suffix in (".pt", ".bin", ".pkl")]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"key": [[8, 8]], "value": [[8, 8]]}), "have 1 layers but the model has 2"),
    (json.dumps({"key": [[8, 8, 8]] * 2, "value": [[8, 8]] * 2}), "have 3 entries but the model has 2 KV heads"),
    (json.dumps({"key": [[8, 17]] * 2, "value": [[8, 8]] * 2}), "outside [1, head_dim=16]"),
    (json.dumps([1, 2, 3]), 'must be a dict with "key" and "value"'),
])
def test_eval_checks_rank_files_before_any_inference(base, tmp_path, capsys, monkeypatch, content, message) -> None:
    pca = tmp_path / "pca"
    assert _calibrate(base, pca) == 0
    ranks = tmp_path / "ranks.json"
    ranks.write_text(content)
    _no_model_loading(monkeypatch)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(pca), "--rank-file", str(ranks), "--data", str(base[1]),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the calibration fixture's progress bar
    assert last.startswith("mkv: error: rank file") and message in last
    assert not list(tmp_path.glob("eval*"))


def test_eval_kv_bits_sweeps_ranks_times_bits(base, tmp_path) -> None:
    pca = tmp_path / "pca"
    assert _calibrate(base, pca) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(pca), "--budgets", "1,0.5", "--kv-bits", "16", "--kv-bits", "4/2",
                 "--kv-group", "16", "--data", str(base[1]), "--tokens", "256", "--seq-len", "64",
                 "--out", str(out)]) == 0
    rows = json.loads(Path(f"{out}.json").read_text())["rows"]
    assert [(r["setting"], r["kv_bits"]) for r in rows] == [("1", "16"), ("0.5", "16"), ("1 x4/2b", "4/2"),
                                                          ("0.5 x4/2b", "4/2")]
    full, half, full_q, half_q = rows
    assert full["cache_ratio"] == 1.0 and half["cache_ratio"] == 0.5
    # 4-bit keys, 2-bit values, float16 scale and zero: (16*4/8 + 4*16/16 + 16*2/8 + 4) / (2 * 16 * 4 bytes)
    assert full_q["cache_ratio"] == pytest.approx((8 + 4 + 4 + 4) / 128)
    assert full_q["bf16_ratio"] == pytest.approx((8 + 4 + 4 + 4) / 64) and half["bf16_ratio"] == 0.5
    assert full_q["perplexity"] != full["perplexity"] and all(r["perplexity"] > 1 for r in rows)
    assert half_q["cache_ratio"] == pytest.approx((4 + 2 + 2 + 4) / 128)  # value scales stay per token


def test_eval_passkey_scores_retrieval_by_depth(base, tmp_path) -> None:
    pca = tmp_path / "pca"
    assert _calibrate(base, pca) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(pca), "--model", str(base[0]), "--label", "pca", "--label", "base",
                 "--budgets", "1,0.5", "--data", str(base[1]), "--tokens", "128", "--seq-len", "64",
                 "--passkey", "96", "--passkey-depths", "0,1", "--passkey-per-depth", "2", "--out", str(out)]) == 0
    rows = json.loads(Path(f"{out}.json").read_text())["passkey"]
    assert {(r["model"], r["setting"], r["depth"]) for r in rows} == {
        (m, s, d) for m, s in (("pca", "1"), ("pca", "0.5"), ("base", "full")) for d in (0.0, 1.0)}
    assert all(r["items"] == 2 == len(r["answers"]) and r["accuracy"] == r["correct"] / 2 for r in rows)
    answers = {(r["model"], r["setting"], r["depth"]): r["answers"] for r in rows}
    for depth in (0.0, 1.0):  # full rank generates exactly what the base model generates
        assert answers[("pca", "1", depth)] == answers[("base", "full", depth)]


def test_eval_refuses_a_too_short_passkey_prompt_before_any_inference(base, tmp_path, capsys, monkeypatch) -> None:
    _no_model_loading(monkeypatch)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(base[0]), "--passkey", "32", "--data", str(base[1]), "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mkv: error:") and "--passkey" in last
    assert not list(tmp_path.glob("eval*"))


@pytest.mark.parametrize("flags, message", [
    (["--passkey", "abc"], "--passkey 'abc' must be comma-separated whole numbers"),
    (["--passkey", "128,2k"], "--passkey '128,2k' must be comma-separated whole numbers"),
    (["--passkey", "128", "--passkey-depths", "half"], "--passkey-depths 'half' must be comma-separated numbers"),
    (["--passkey", "128", "--passkey-per-depth", "0"], "--passkey-per-depth must be at least 1"),
])
def test_eval_names_the_passkey_flag_of_a_bad_value(base, tmp_path, capsys, monkeypatch, flags, message) -> None:
    _no_model_loading(monkeypatch)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(base[0]), *flags, "--data", str(base[1]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid literal" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mkv: error:") and message in last
    assert not list(tmp_path.glob("eval*"))


def test_a_corrupt_projections_config_is_reported_as_such(tmp_path, capsys, monkeypatch) -> None:
    artifact = tmp_path / "projections"
    artifact.mkdir()
    (artifact / "projections_config.json").write_text('{"format": "matryoshka-kv-proj')  # cut short
    (artifact / "projections.safetensors").write_bytes(b"\0" * 64)
    _no_model_loading(monkeypatch)
    assert main(["eval", "--model", str(artifact), "--out", str(tmp_path / "eval")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "projections_config.json' is not valid JSON" in last and "re-export" in last
    assert "config.json)" not in last and "not a local Hugging Face model directory" not in last


@pytest.mark.parametrize("bits", ["3", "4/5", "x", "4/4/4"])
def test_eval_refuses_unsupported_bits_before_any_inference(base, tmp_path, capsys, monkeypatch, bits) -> None:
    _no_model_loading(monkeypatch)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(base[0]), "--kv-bits", bits, "--data", str(base[1]), "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mkv: error:") and "--kv-bits" in last
    assert not list(tmp_path.glob("eval*"))
