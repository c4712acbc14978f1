"""Embedded assets: corpus splits and the embedded model cache."""

from __future__ import annotations

import json

import pytest

from plugin.commands.info import assets_state
from plugin.storage import assets, corpus


def test_splits_are_disjoint_and_cover_the_corpus():
    names = list(corpus.CORPUS_SPLITS)
    assert names == ["calibration", "training", "evaluation"]
    files = {name: set(corpus.corpus_files(name)) for name in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not files[a] & files[b], f"{a} and {b} overlap"
    assert sum(len(f) for f in files.values()) == len(list(assets.corpus_dir().glob("*.txt")))


def test_split_years():
    cal, train, ev = (corpus.corpus_years(s) for s in ("calibration", "training", "evaluation"))
    assert cal == sorted(cal) and train == sorted(train) and ev == sorted(ev)
    assert cal[0] == 1790 and cal[-1] <= 1899
    assert 1900 <= train[0] and train[-1] <= 1999
    assert ev[0] >= 2000 and ev[-1] >= 2024
    assert max(cal) < min(train) and max(train) < min(ev)
    texts = corpus.corpus_texts("evaluation")
    assert len(texts) == len(ev) and all(len(t) > 1000 for t in texts)
    # enough held-out text: ~100k tokens is at least ~400k characters of English
    assert sum(len(t) for t in texts) > 400_000


@pytest.mark.parametrize("fn", [corpus.corpus_texts, corpus.corpus_years, corpus.corpus_files])
def test_bad_split_name(fn):
    with pytest.raises(ValueError, match="calibration, training, evaluation"):
        fn("test")


def test_chunking_and_jsonl(tmp_path):
    text = "First paragraph.\n\n" + ("A long sentence here. " * 300) + "\n\nLast one."
    chunks = corpus.chunk_text(text, max_chars=500)
    assert all(0 < len(c) <= 500 for c in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())
    out = tmp_path / "d" / "eval.jsonl"
    n = corpus.write_corpus_jsonl("evaluation", out, max_chars=2000)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n > 50
    assert all(set(r) == {"text"} and 0 < len(r["text"]) <= 2000 for r in rows)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MKV_CACHE_DIR", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MKV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "matryoshka-kv"
    state = assets_state(tmp_path / "nothing")
    assert state["model_cached"] is False and state["corpus_speeches"] == 249


@pytest.mark.slow
def test_embedded_model_cache_rebuilds_when_corrupt(tmp_path, monkeypatch, caplog):
    """A copy of the machine's built cache is used as it is; corrupted, it is rebuilt (one build, ~50 s)."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tmp_path / assets.MODEL_SUBDIR
    shutil.copytree(assets.embedded_model_dir(), model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", assets.MARKER_FILE):
        assert (model_dir / name).is_file()
    assert assets_state(tmp_path)["model_cached"] is True
    stamp = (model_dir / assets.MARKER_FILE).stat().st_mtime_ns
    with caplog.at_level("WARNING", logger="plugin.storage.assets"):
        assert assets.embedded_model_dir(tmp_path) == model_dir  # cached: no rebuild
    assert "building" not in caplog.text and (model_dir / assets.MARKER_FILE).stat().st_mtime_ns == stamp

    # corrupt the weights (same size, different bytes at the end)
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.seek(size - 16)
        fh.write(b"\xff" * 16)
    assert assets_state(tmp_path)["model_cached"] is False
    with caplog.at_level("WARNING", logger="plugin.storage.assets"):
        assert assets.embedded_model_dir(tmp_path) == model_dir
    assert "rebuilding" in caplog.text
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".stale-*"))

    model, tokenizer = assets.load_embedded_model(tmp_path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (30, 9, 3, 64)
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("Mr. Speaker, Madam Vice President")["input_ids"]
    assert ids[0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
