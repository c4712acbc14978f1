"""Tests of the benchmark scripts.

The slow ones run each script with --quick as a subprocess (tiny checkpoints or tiny sizes in temp dirs,
nothing written to docs/) and check the figures against values computed here independently: cache bytes
from the model's shape (2 x layers x KV heads x rank x 4 bytes per token), ratios from the two runs' own
times, trainable parameters from the projection shapes. The fast ones test the chance / majority helpers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
FLOAT32 = 4


chance = importlib.import_module("benchmarks.chance")


def _run(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{Path(script).stem}", "--quick", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _assert_png(path: Path) -> None:
    """A decodable PNG with a real image in it (not just the 8 magic bytes)."""
    import matplotlib.image

    assert path.stat().st_size > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not a blank canvas


def _shape(config_path: Path) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) read from a checkpoint's config.json."""
    cfg = json.loads(config_path.read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"], cfg["num_key_value_heads"], head_dim


@pytest.fixture
def docs_untouched():
    """--quick must not write into docs/."""
    docs = REPO / "docs"
    before = {p: p.stat().st_mtime_ns for p in docs.rglob("*")} if docs.exists() else {}
    yield
    after = {p: p.stat().st_mtime_ns for p in docs.rglob("*")} if docs.exists() else {}
    assert after == before, "a --quick run changed docs/"


@pytest.mark.slow
def test_decode_memory_quick(tmp_path, docs_untouched):
    proc = _run("decode_memory.py", "--work-dir", str(tmp_path), "--quant-bits", "4")
    assert "decode_memory quick run ok" in proc.stdout
    result = json.loads((tmp_path / "decode_memory.json").read_text())
    from plugin.storage import assets

    layers, kv_heads, head_dim = _shape(Path(assets.embedded_model_dir()) / "config.json")
    rows = {row["setting"]: row for row in result["rows"]}
    assert set(rows) == {"dynamic", "static", "1.0", "0.5", "0.25", "1.0x4b", "0.5x4b"}
    for budget in ("1.0", "0.5"):  # 4-bit codes + scales and a full-precision tail: fewer bytes than unquantized
        assert 0 < rows[f"{budget}x4b"]["cache_bytes"] < rows[budget]["cache_bytes"]
        assert rows[f"{budget}x4b"]["tokens_per_s"] > 0 and rows[f"{budget}x4b"]["peak_rss_mib"] is None
    batch = rows["dynamic"]["batch"]
    tokens = rows["dynamic"]["context"] + result["meta"]["new_tokens"] + 1  # the prefill, a warm-up step, the timed steps
    full = 2 * layers * kv_heads * head_dim * FLOAT32 * tokens * batch
    assert rows["dynamic"]["cache_bytes"] == rows["static"]["cache_bytes"] == full
    best = max(rows["dynamic"]["tokens_per_s"], rows["static"]["tokens_per_s"])
    for budget in (1.0, 0.5, 0.25):
        row = rows[str(budget)]
        rank = int(budget * head_dim)  # 1/2 and 1/4 of head_dim are multiples of the d/8 grid step
        assert row["cache_bytes"] == 2 * layers * kv_heads * rank * FLOAT32 * tokens * batch == budget * full
        assert row["allocated_bytes"] >= row["cache_bytes"]
    for row in rows.values():  # each ratio is over the faster baseline of the same process
        assert row["speed_vs_best_baseline"] == pytest.approx(row["tokens_per_s"] / best, rel=1e-9)
    for setting, row in rows.items():  # --quick reads RSS for two settings only
        if setting in ("dynamic", "0.5"):
            assert row["peak_rss_mib"] > row["rss_over_model_mib"] >= 0
        else:
            assert row["peak_rss_mib"] is None
    _assert_png(tmp_path / "decode_memory.png")


@pytest.mark.slow
def test_quality_quick(tmp_path, docs_untouched):
    proc = _run("quality.py", "--work-dir", str(tmp_path))
    assert "quality quick run ok" in proc.stdout
    result = json.loads((tmp_path / "quality.json").read_text())
    models = {row["model"] for row in result["rows"]}
    assert {"full", "pca", "matryoshka", "matryoshka-searched", "weight-pca", "weight-pca-shared",
            "svd-latent"} <= models
    layers, kv_heads, head_dim = _shape(tmp_path / "pcallama" / "config.json")
    full = 2 * layers * kv_heads * head_dim * FLOAT32
    for row in result["rows"]:
        assert row["perplexity"] > 1
        assert row["full_cache_bytes_per_token"] == full
        # every method, baselines included, must hold exactly the budget's share of the full cache
        assert row["cache_bytes_per_token"] == pytest.approx(row["budget"] * full, abs=1e-6), row
        if row["model"] in ("pca", "matryoshka") and not str(row["setting"]).endswith(".json"):
            rank = round(row["budget"] * head_dim)
            assert row["cache_bytes_per_token"] == 2 * layers * kv_heads * rank * FLOAT32
    searched = [r for r in result["rows"] if r["model"] == "matryoshka-searched" and r["setting"].endswith(".json")]
    assert sorted(round(r["budget"], 3) for r in searched) == [0.375, 0.5]
    _assert_png(tmp_path / "quality.png")
    for name in ("ranks-0.5.json", "ranks-0.375.json"):
        assert (tmp_path / name).is_file()


@pytest.mark.slow
def test_accuracy_quick(tmp_path, docs_untouched):
    proc = _run("accuracy.py", "--work-dir", str(tmp_path))
    assert "accuracy quick run ok" in proc.stdout
    result = json.loads((tmp_path / "accuracy.json").read_text())
    assert result["meta"]["items"] == {"piqa": 2, "obqa": 2}
    models = {row["model"] for row in result["rows"]}
    assert models == {"base-uncompressed", "pca-100%", "pca-50%", "matryoshka-100%", "matryoshka-50%",
                      "matryoshka-searched-50%"}
    assert {r["dataset"] for r in result["meta"]["speed"]} == {"piqa-quick"}
    for row in result["rows"]:
        assert 0 <= row["accuracy"] <= 100 and row["stderr"] >= 0 and row["n"] == 2
    summary = {(r["model"], r["dataset"]): r["accuracy"] for r in result["rows"]}
    for dataset in ("piqa", "obqa"):  # full rank computes the base model's function
        assert summary[("pca-100%", dataset)] == summary[("base-uncompressed", dataset)]
    agreement = {(r["model"], r["dataset"]): r.get("agreement") for r in result["rows"]}
    for dataset in ("piqa", "obqa"):  # per-set agreement with the base model's answers, the base with itself 100%
        assert agreement[("base-uncompressed", dataset)] == 100.0
        assert agreement[("pca-100%", dataset)] == 100.0
        assert all(0 <= agreement[(m, dataset)] <= 100 for m in models)
    rates = result["meta"]["rates"]
    assert rates["piqa"]["n"] == rates["obqa"]["n"] == 2
    assert rates["piqa"]["chance"] == 0.5 and rates["obqa"]["chance"] == 0.25  # 2 and 4 options per item
    assert rates["piqa"]["majority"] in (0.5, 1.0) and rates["obqa"]["majority"] in (0.5, 1.0)
    assert "| majority answer |" in proc.stdout
    _assert_png(tmp_path / "accuracy.png")


@pytest.mark.slow
def test_training_cost_quick(tmp_path, docs_untouched):
    proc = _run("training_cost.py", "--work-dir", str(tmp_path))
    assert "training_cost quick run ok" in proc.stdout
    result = json.loads((tmp_path / "training_cost.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"distill", "plain", "distill-2draws", "plain-2draws"}
    layers, kv_heads, head_dim = _shape(tmp_path / "model" / "config.json")
    # the same workload: per (layer, KV head) a d x d Cayley generator for K and for V, plus mu_V
    projections = layers * kv_heads * (2 * head_dim * head_dim + head_dim)
    for name, row in rows.items():
        assert row["trainable"].startswith(f"{projections:,} of "), (name, row["trainable"])
        assert row["steps"] == 3 and row["s_per_step"] > 0 and row["peak_rss_mib"] > 50
        runtime = json.loads((tmp_path / name / "train_results.json").read_text())["train_runtime"]
        assert row["runtime_per_step"] == pytest.approx(runtime / 3)
    # the headline ratio is distill's time over plain's, not a row over itself
    assert rows["distill"]["ratio_to_plain"] == pytest.approx(rows["distill"]["s_per_step"] / rows["plain"]["s_per_step"])
    two = rows["distill-2draws"]
    assert two["reference"] == "plain-2draws"
    assert two["ratio_to_plain"] == pytest.approx(two["s_per_step"] / rows["plain-2draws"]["s_per_step"])
    assert "matryoshka_rank_samples=2" in two["command"]
    _assert_png(tmp_path / "training_cost.png")


@pytest.mark.slow
def test_run_all_rejects_unknown_benchmark():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--only", "nope"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "unknown benchmark" in proc.stderr


def test_majority_rate_of_a_known_list():
    assert chance.majority_rate(["A", "B", "B", "C"]) == 0.5
    assert chance.majority_rate(["B", "A", "B", "B", "A"]) == 0.6
    assert chance.majority_rate(["A"]) == 1.0
    with pytest.raises(ValueError):
        chance.majority_rate([])


def test_chance_rate_averages_over_items():
    assert chance.chance_rate([2, 2]) == 0.5
    assert chance.chance_rate([2, 4]) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        chance.chance_rate([])


def test_item_rates_read_options_and_answers():
    rows = [{"question": "q1", "A": "x", "B": "y", "answer": "B"},
            {"question": "q2", "A": "x", "B": "y", "C": "z", "answer": "B"},
            {"question": "q3", "A": "x", "B": "y", "answer": "A"},
            {"question": "q4", "A": "x", "B": "y", "answer": "B"}]
    rates = chance.item_rates(rows)
    assert rates["n"] == 4 and rates["majority"] == 0.75 and rates["majority_answer"] == "B"
    assert rates["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    assert rates["options"] == [2, 3]


@pytest.mark.slow
def test_key_centring_quick() -> None:
    proc = _run("key_centring.py")
    path = Path(proc.stdout.strip().splitlines()[-1].split("ok: ", 1)[1])
    rows = json.loads(path.read_text())["rows"]
    by = {(r["model"], round(r["budget"], 4)): r for r in rows}
    assert set(by) == {(f"pca-{s}", b) for s in ("covariance", "second-moment") for b in (1.0, 0.5)}
    # at full rank both bases are rotations: the same function as the base model
    assert by[("pca-covariance", 1.0)]["perplexity"] == pytest.approx(by[("pca-second-moment", 1.0)]["perplexity"],
                                                                      rel=1e-5)
    layers, kv_heads, head_dim = _shape(path.parent / "covariance" / "config.json")
    for (_, budget), row in by.items():
        assert row["cache_bytes_per_token"] == 2 * layers * kv_heads * int(budget * head_dim) * FLOAT32
    summaries = [json.loads((path.parent / s / "pca_summary.json").read_text()) for s in ("covariance", "second-moment")]
    assert [s["key_statistic"] for s in summaries] == ["covariance", "second-moment"]


def test_frontier_on_tiny_models_reads_bytes_from_the_cache(tmp_path) -> None:
    """benchmarks/frontier.py end to end on a tiny base and its PCA: rows, measured bytes, the table."""
    from conftest import make_tiny_llama
    from helpers import save_tiny_base

    from plugin.cli import main as mkv

    save_tiny_base(make_tiny_llama("gqa"), tmp_path / "base", tmp_path / "text.txt")
    assert mkv(["calibrate", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "text.txt"),
                "--tokens", "256", "--seq-len", "32", "--out", str(tmp_path / "pca")]) == 0
    frontier = importlib.import_module("benchmarks.frontier")
    out = tmp_path / "frontier"
    assert frontier.main(["--base", str(tmp_path / "base"), "--model", str(tmp_path / "pca"), "--label", "pca",
                          "--budgets", "0.5", "--bits", "16,2", "--quant-bits", "16,4", "--group", "16",
                          "--tokens", "1024", "--searched", "--search-samples", "2", "--search-seq-len", "32",
                          "--out", str(out)]) == 0
    result = json.loads(Path(f"{out}.json").read_text())
    searched = [r for r in result["rows"] if r["method"] == "pca searched"]
    assert [r["target_fraction"] for r in searched] == list(frontier.FRACTIONS)
    for row in searched:  # the allocator's bytes, read back from the cache, within each target
        assert row["bf16_ratio"] <= row["target_fraction"] + 1e-9 and row["bits"] in ("16", "4")
    got = {(r["method"], r["budget"], r["bits"]): r for r in result["rows"] if r not in searched}
    assert set(got) == {("quant-only", 1.0, "16"), ("quant-only", 1.0, "4"), ("pca", 0.5, "16"), ("pca", 0.5, "2")}
    assert got[("quant-only", 1.0, "16")]["bf16_ratio"] == 1.0 and got[("pca", 0.5, "16")]["bf16_ratio"] == 0.5
    # head_dim 16, group 16: 4-bit codes 8 bytes + scales 4 + 8 + 4 per head and token, against 2 x 16 x 2 bytes
    assert got[("quant-only", 1.0, "4")]["bf16_ratio"] == pytest.approx((8 + 4 + 8 + 4) / 64)
    assert got[("quant-only", 1.0, "16")]["bytes_per_token_fp32_model"] == 2 * 2 * 2 * 16 * FLOAT32
    half = next(e for e in result["frontier"] if e["fraction"] == 0.5)
    fitting = [r["perplexity"] for r in result["rows"] if r["method"] != "quant-only" and r["bf16_ratio"] <= 0.5]
    assert half["ranks x bits"]["perplexity"] == min(fitting) and half["quantization alone"]["bits"] == "4"
    assert half["pca"] == half["ranks x bits"]  # one checkpoint: its own column is the best of ours
    Path(f"{out}.png").unlink()
    assert frontier.main(["--render-only", "--out", str(out)]) == 0 and Path(f"{out}.png").is_file()
    text = frontier.render(result)
    assert "| 1/8 |" in text and "searched" in text
    _assert_png(Path(f"{out}.png"))


def test_longctx_on_a_tiny_model(tmp_path) -> None:
    """benchmarks/longctx.py end to end: retrieval rows per (setting, context, depth); last-512 perplexity at
    full rank equal to the base model's; quant-only and tiered rows at their measured bytes."""
    import math

    from conftest import make_tiny_llama
    from helpers import save_tiny_pca
    from transformers import AutoTokenizer, DynamicCache

    from plugin.storage.texts import load_texts, token_windows

    base = make_tiny_llama("gqa")
    save_tiny_pca(base, tmp_path / "base", tmp_path / "pca")
    longctx = importlib.import_module("benchmarks.longctx")
    out = tmp_path / "longctx.json"
    head_dim = base.config.head_dim
    assert longctx.main(["--full", "--model", str(tmp_path / "pca"), "--label", "tiny", "--budgets", "1,0.5",
                         "--base", str(tmp_path / "base"), "--quant-bits", "4", "--tiered", f"64@{head_dim // 2}",
                         "--tiered-budget", "0.25", "--contexts", "200", "--depths", "0,1", "--per-depth", "1",
                         "--ppl-contexts", "600", "--ppl-windows", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = {"full", "tiny 1", "tiny 0.5", f"tiered 64@{head_dim // 2} <= 0.25", "quant-only 4b"}
    assert {(r["setting"], r["depth"]) for r in result["retrieval"]} == {(n, d) for n in names for d in (0.0, 1.0)}
    ppl = {r["setting"]: r for r in result["perplexity"]}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "pca")
    window = token_windows(tokenizer, load_texts(None, split="evaluation"), 600, 600)
    nll = longctx.last_tokens_nll(base, window, DynamicCache())
    assert ppl["tiny 1"]["last512_perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    assert ppl["full"]["last512_perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-6)
    # every row carries its paired interval against the full cache, from the 64-token block sums it keeps
    assert len(ppl["tiny 0.5"]["block_nll"]) == 512 // 64
    assert ppl["tiny 1"]["vs_full"]["ratio"] == pytest.approx(1.0, abs=1e-4)
    half = ppl["tiny 0.5"]["vs_full"]
    assert half["against"] == "full" and half["low"] <= half["ratio"] <= half["high"]
    assert ppl["tiny 1"]["bytes_fraction"] == 1.0 and ppl["tiny 0.5"]["bytes_fraction"] == 0.5
    assert ppl["tiny 0.5"]["last512_perplexity"] != ppl["tiny 1"]["last512_perplexity"]
    from benchmarks.longctx_settings import tiered_old_rank

    old = tiered_old_rank(0.25 * head_dim, head_dim // 2, 600, 64)
    tiered = ppl[f"tiered 64@{head_dim // 2} <= 0.25"]["bytes_fraction"]
    assert tiered == pytest.approx((64 * (head_dim // 2) + (600 - 64) * old) / (600 * head_dim)) and tiered <= 0.25
    # 4-bit codes + float16 scale and zero per group: keys per channel over 64 tokens, values per token over head_dim
    # (over every token but the 600 % 64 = 24 of a block not yet full, held uncoded and paid at bfloat16)
    per_element = ((0.5 + 4 / 64) + (0.5 + 4 / head_dim)) / 2
    assert ppl["quant-only 4b"]["bytes_fraction"] == pytest.approx((576 * per_element / 2 + 24) / 600)
    section = longctx.render(result)
    assert "| tiny 0.5 | 0.500 |" in section and "| quant-only 4b |" in section and "depth 1" in section


def test_longctx_evict_rows_compose_eviction_ranks_and_bits_at_measured_bytes(tmp_path, monkeypatch) -> None:
    """--evict R@BITS:B: the project's prefill eviction on the first --model's cache at rank budget R and BITS,
    evicting down to B of the bytes once the scored tokens are held; a length where they alone exceed it is skipped."""
    from conftest import make_tiny_llama
    from helpers import save_tiny_pca

    base = make_tiny_llama("gqa", attn_implementation="sdpa")
    save_tiny_pca(base, tmp_path / "base", tmp_path / "pca")
    longctx = importlib.import_module("benchmarks.longctx")
    out = tmp_path / "evict.json"
    assert longctx.main(["--model", str(tmp_path / "pca"), "--label", "tiny", "--budgets", "1",
                         "--evict", "1@4:0.2,0.5@16:0.3,1@8/4:0.3", "--contexts", "200", "--depths", "1", "--per-depth", "1",
                         "--ppl-contexts", "600,1200", "--ppl-windows", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ppl = {(r["setting"], r["context"]): r for r in result["perplexity"]}
    assert set(ppl) == {("tiny 1", 600), ("tiny 1", 1200), ("tiny 1 x 4b + evict <= 0.2", 1200),
                        ("tiny 0.5 x 16b + evict <= 0.3", 1200), ("tiny 1 x 8/4b + evict <= 0.3", 1200)}
    quantized, projected = ppl[("tiny 1 x 4b + evict <= 0.2", 1200)], ppl[("tiny 0.5 x 16b + evict <= 0.3", 1200)]
    assert quantized["bytes_fraction"] == pytest.approx(0.2, abs=1e-3) and quantized["bytes_fraction"] <= 0.2
    assert projected["bytes_fraction"] == pytest.approx(0.3, abs=1e-3) and projected["method"] == "evict-ranks-bits"
    assert ppl[("tiny 1 x 8/4b + evict <= 0.3", 1200)]["bytes_fraction"] == pytest.approx(0.3, abs=1e-3)
    full = ppl[("tiny 1", 1200)]["last512_perplexity"]
    assert quantized["last512_perplexity"] != full and projected["last512_perplexity"] != full
    assert {r["setting"] for r in result["retrieval"]} == {"tiny 1", "tiny 1 x 4b + evict <= 0.2",
                                                          "tiny 0.5 x 16b + evict <= 0.3", "tiny 1 x 8/4b + evict <= 0.3"}
    _assert_png(longctx.longctx_png(result, tmp_path / "longctx.png"))
    with pytest.raises(SystemExit):
        longctx.main(["--model", str(tmp_path / "pca"), "--evict", "1@3:0.2", "--out", str(out)])


def test_longctx_rank_file_rows_hold_their_bytes_and_answer_prompts_only_when_asked(tmp_path) -> None:
    """--rank-file: a composition file of the allocator is measured at its own context only, within the bytes it
    states; its pass-key prompts are answered only with --rank-file-prompts."""
    from conftest import make_tiny_llama
    from helpers import save_tiny_pca

    from plugin.budgets.composition import compose
    from plugin.budgets.ranks import write_rank_file

    base = make_tiny_llama("gqa", attn_implementation="sdpa")
    pca = save_tiny_pca(base, tmp_path / "base", tmp_path / "pca", key_space="pre-rope")
    import torch

    windows = torch.randint(0, 128, (1, 1200), generator=torch.Generator().manual_seed(0))
    result = compose(pca, 0.125, windows, scored=512, group=64, finalists=1, progress=False, log=lambda _: None)
    cfg = pca.config
    write_rank_file(tmp_path / "alloc.json", result.ranks, cfg.head_dim,
                    **result.file_fields(cfg.num_hidden_layers, cfg.num_key_value_heads))
    longctx = importlib.import_module("benchmarks.longctx")
    common = ["--model", str(tmp_path / "pca"), "--label", "tiny", "--budgets", "", "--rank-file",
              f"a={tmp_path / 'alloc.json'}", "--contexts", "200", "--depths", "1", "--per-depth", "1",
              "--ppl-contexts", "600,1200", "--ppl-windows", "1"]
    assert longctx.main([*common, "--out", str(tmp_path / "plain.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    (row,) = plain["perplexity"]  # its own context only
    assert row["context"] == 1200 and row["method"] == "composition" and row["setting"].startswith("tiny a (")
    assert row["bytes_fraction"] <= 0.125 + 1e-9 and row["bytes_fraction"] == pytest.approx(result.bytes_fraction)
    assert plain["retrieval"] == []
    assert longctx.main([*common, "--rank-file-prompts", "--out", str(tmp_path / "asked.json")]) == 0
    asked = json.loads((tmp_path / "asked.json").read_text())
    assert [(r["setting"], r["context"], r["items"]) for r in asked["retrieval"]] == [(row["setting"], 200, 1)]


def test_longctx_keeps_finished_settings_when_a_pass_stops_and_resumes_them(tmp_path, monkeypatch) -> None:
    """A pass-key-only pass (no perplexity lengths) writes each setting's rows as it finishes: stopped midway,
    the file holds the finished ones, and --append measures only the rest."""
    from conftest import make_tiny_llama
    from helpers import save_tiny_pca

    base = make_tiny_llama("gqa", attn_implementation="sdpa")
    save_tiny_pca(base, tmp_path / "base", tmp_path / "pca")
    from plugin.evaluation import retrieval

    longctx = importlib.import_module("benchmarks.longctx")
    answered, real = [], retrieval.generate_answers

    def stops_at_the_second(model, tokenizer, items, desc, **kwargs):
        answered.append(desc)
        if len(answered) == 2:
            raise KeyboardInterrupt  # the pass stopped by hand
        return real(model, tokenizer, items, desc=desc, **kwargs)

    monkeypatch.setattr(retrieval, "generate_answers", stops_at_the_second)
    out = tmp_path / "resumed.json"
    args = ["--model", str(tmp_path / "pca"), "--label", "tiny", "--budgets", "1,0.5", "--contexts", "200",
            "--depths", "1", "--per-depth", "1", "--ppl-contexts", "", "--append", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        longctx.main(args)
    assert {r["setting"] for r in json.loads(out.read_text())["retrieval"]} == {"tiny 1"}
    answered.clear()
    monkeypatch.setattr(retrieval, "generate_answers", lambda *a, **k: (answered.append(k["desc"]), real(*a, **k))[1])
    assert longctx.main(args) == 0
    assert answered == ["tiny 0.5 @ 200"]
    result = json.loads(out.read_text())
    assert [r["setting"] for r in result["retrieval"]] == ["tiny 1", "tiny 0.5"] and result["perplexity"] == []
    assert len(result["commands"]) == 2


def test_frontier_summary_reads_each_line_at_or_below_each_budget() -> None:
    """benchmarks.longctx_frontier's summary: a line's point at a budget is its best row within those bytes, the
    allocator's is the row of the file searched for that budget, and the comparison pairs the two rows' blocks."""
    import math

    frontier = importlib.import_module("benchmarks.longctx_frontier")

    def row(setting: str, method: str, nbytes: float, nll: float) -> dict:
        return {"setting": setting, "method": method, "context": 4096, "bytes_fraction": nbytes, "windows": 1,
                "last512_perplexity": math.exp(nll), "block_nll": [nll * 64 + i % 3 for i in range(8)]}

    rows = [row("full", "full", 1.0, 3.0), row("longctx 0.5", "longctx", 0.5, 3.4),
            row("longctx 0.25", "longctx", 0.25, 3.9), row("quant-only 4b", "quant-only", 0.281, 3.01),
            row("longctx alloc-1/4 (ranks 1 x 4 bits x 0.9 of the prompt (uniform))", "composition", 0.2499, 3.02),
            row("longctx alloc-1/8 (ranks 0.75 per head x 4 bits x 0.5 of the prompt (uniform))", "composition",
                0.125, 3.05),
            row("longctx 1 x 4b + evict <= 0.125", "evict-ranks-bits", 0.125, 3.1),
            row("snapkv 0.125", "kvpress-snapkv", 0.1251, 2.9),  # a hair above 1/8: not a point at 1/8
            row("longctx alloc-1/8-kept-0.5 (ranks 0.5 x 4 bits x 0.7 of the prompt (uniform))", "composition",
                0.125, 3.3),
            # a file whose cache holds more than its budget (searched when fewer bytes were counted): no verdict
            row("longctx alloc-1/6 (ranks 1 x 4 bits x 0.5 of the prompt (uniform))", "composition", 0.177, 3.0)]

    def answers(setting: str, length: int, right: list[int]) -> list[dict]:  # two depths of five prompts
        parts = [right[:5], right[5:]]
        return [{"setting": setting, "context": length, "depth": d, "right": part, "correct": sum(part), "items": 5,
                 "accuracy": sum(part) / 5} for d, part in zip((0.0, 1.0), parts)]

    full, quarter_alloc = [1] * 8 + [0] * 2, [1] * 6 + [0] * 4  # keeps 6 of the full cache's 8 at 128 tokens
    retrieval = (answers("full", 128, full) + answers("full", 256, full)
                 + answers("longctx alloc-1/4 (ranks 1 x 4 bits x 0.9 of the prompt (uniform))", 128, quarter_alloc)
                 + answers("longctx alloc-1/4 (ranks 1 x 4 bits x 0.9 of the prompt (uniform))", 256, full))
    summary = {e["name"]: e for e in frontier.summarize({"perplexity": rows, "retrieval": retrieval})}
    quarter = summary["1/4"]
    assert quarter["lines"]["ranks alone"]["setting"] == "longctx 0.25"  # 0.5 holds too many bytes
    assert "bits alone (ours)" not in quarter["lines"]  # 0.281 of the bytes is more than 1/4
    assert quarter["lines"]["allocator"]["setting"].startswith("longctx alloc-1/4 ")
    assert quarter["allocator_uses_ranks_below_full"] is False
    eighth = summary["1/8"]
    assert "kvpress SnapKV" not in eighth["lines"] and eighth["best_other"]["setting"] == "longctx 1 x 4b + evict <= 0.125"
    assert eighth["allocator_vs_best_other"]["ratio"] == pytest.approx(math.exp(-0.05))
    assert eighth["strictly_better"] and eighth["allocator_uses_ranks_below_full"] is True
    assert eighth["allocator_vs_full"] == pytest.approx(math.exp(0.05))
    assert "allocator" not in summary["1/16"]["lines"]
    # the floor's row is its own line, never the allocator's point nor its rival
    floor = "allocator, every layer keeps >= 0.5 of the prompt"
    assert eighth["lines"][floor]["setting"].startswith("longctx alloc-1/8-kept-0.5 ")
    ordered = importlib.import_module("benchmarks.longctx_summary").ordered
    assert ordered({"kvpress SnapKV", floor, "allocator", "allocator, every layer keeps >= 1 of the prompt",
                    "ranks alone"}) == ["allocator", floor, "allocator, every layer keeps >= 1 of the prompt",
                                        "ranks alone", "kvpress SnapKV"]
    assert eighth["lines"]["allocator"]["setting"].startswith("longctx alloc-1/8 ")
    # retrieval beside each point: paired against the full cache on the same prompts
    got = quarter["lines"]["allocator"]["retrieval"]
    assert (got["128"]["correct"], got["128"]["items"], got["256"]["correct"]) == (6, 10, 8)
    assert got["128"]["kept"]["ratio"] == pytest.approx(0.75) and got["128"]["vs_full"]["ratio"] == pytest.approx(-0.2)
    assert quarter["allocator_keeps_80_percent_of_retrieval"] is False  # 6 of 8 at 128 tokens
    assert quarter["lines"]["ranks alone"]["retrieval"] == {}  # not answered: nothing claimed
    text = frontier.render({"perplexity": rows, "retrieval": retrieval, "command": "c", "commands": ["c"],
                            "machine": "m", "versions": "v", "date": "d"},
                           list(summary.values()), "f.png")
    assert "| 1/4 |" in text and "6/10" in text
    sixth = summary["1/6"]
    assert sixth["allocator_over_budget"] == 0.177 and "allocator_vs_best_other" not in sixth
    assert "no_worse" not in sixth and "over its budget (0.177 held)" in text


def test_quant_kernels_measures_ours_with_exact_bytes_and_bounded_error(tmp_path) -> None:
    """benchmarks/quant_kernels.py in process on a small shape: this project's row has the formula's bytes and
    an error within half a grid step; competitors are measured when installed, else reported missing."""
    kernels = importlib.import_module("benchmarks.quant_kernels")
    rows = kernels.measure([40], [4], heads=3, tokens=128, repeats=1)
    assert {row["backend"] for row in rows} == set(kernels.BACKENDS)
    ours = next(row for row in rows if row["backend"].startswith("torch"))
    elements = 3 * 128 * 40
    assert ours["keys_bytes"] == elements // 2 + 2 * 2 * 3 * (128 // 64) * 40  # codes + fp16 scale, zero per block
    assert ours["values_bytes"] == elements // 2 + 2 * 2 * 3 * 128  # codes + fp16 scale, zero per token
    # uniform 4-bit grid: squared error per element <= (range / 15 / 2)^2; relative to these states well under 1%
    assert 0 < ours["keys_rel_error"] < 0.01 and 0 < ours["values_rel_error"] < 0.01
    for row in rows:
        assert "error" in row or row["keys_rel_error"] < 0.02
    text = kernels.render({"command": "x", "heads": 3, "tokens": 128, "repeats": 1, "rows": rows})
    assert "| torch (this project) | 40 | 4 |" in text


class _PrefillPress:
    """Stands in for a kvpress press (the real ones live in a separate env): `act` runs at the prefill forward of
    each attention layer, when the cache holds only that forward's tokens; the hooks always go."""

    def __init__(self, compression_ratio: float) -> None:
        self.compression_ratio = compression_ratio

    def act(self, module, layer, q_len: int) -> None:
        raise NotImplementedError

    def __call__(self, model):
        import contextlib

        @contextlib.contextmanager
        def hooked():
            def hook(module, args, kwargs, output):
                layer = kwargs["past_key_values"].layers[module.layer_idx]
                q_len = kwargs["hidden_states"].shape[1]
                if layer.keys.shape[-2] == q_len:
                    self.act(module, layer, q_len)
                return output

            handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

        return hooked()


class _KeepFirstPress(_PrefillPress):
    """Keeps the first (1 - ratio) of the cached tokens, as a press prunes the cache."""

    def act(self, module, layer, q_len: int) -> None:
        keep = round(q_len * (1 - self.compression_ratio))
        layer.keys, layer.values = layer.keys[:, :, :keep], layer.values[:, :, :keep]
        _KeepFirstPress.prefills += 1


def test_longctx_kvpress_rows_evict_in_the_prefill_at_measured_bytes(tmp_path, monkeypatch) -> None:
    """--kvpress wiring on a tiny base: the press acts on the tokens read first only, at the ratio that leaves the
    budget's bytes once the scored tokens are held; a length whose scored tokens alone exceed it is skipped."""
    import types

    from conftest import make_tiny_llama
    from helpers import save_tiny_base

    fake = types.ModuleType("kvpress")
    fake.KnormPress = fake.SnapKVPress = fake.ExpectedAttentionPress = _KeepFirstPress
    monkeypatch.setitem(sys.modules, "kvpress", fake)
    _KeepFirstPress.prefills = 0
    save_tiny_base(make_tiny_llama("gqa", attn_implementation="sdpa"), tmp_path / "base")
    longctx = importlib.import_module("benchmarks.longctx")
    out = tmp_path / "press.json"
    assert longctx.main(["--kvpress", "knorm:0.5", "--base", str(tmp_path / "base"), "--contexts", "200",
                         "--depths", "0,1", "--per-depth", "1", "--ppl-contexts", "600,1200", "--ppl-windows", "1",
                         "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ppl = {r["context"]: r for r in result["perplexity"]}
    assert set(ppl) == {1200}  # at 600 tokens the 512 scored ones alone are more than half the cache
    assert ppl[1200]["bytes_fraction"] == pytest.approx(0.5) and ppl[1200]["method"] == "kvpress-knorm"
    assert {(r["setting"], r["depth"]) for r in result["retrieval"]} == {("knorm 0.5", 0.0), ("knorm 0.5", 1.0)}
    assert _KeepFirstPress.prefills == 2 * 3  # one prefill per window and per prompt, in each of 2 layers
    with pytest.raises(SystemExit):
        longctx.main(["--kvpress", "pyramid:0.5", "--out", str(out)])


class _MaskFirstPress(_PrefillPress):
    """Stands in for kvpress's AdaKVPress (built around a scorer press): keeps every token in the cache and marks
    the first tokens of KV head 0 as masked (kvpress's `masked_key_indices`), as its per-head presses do."""

    def __init__(self, press) -> None:
        super().__init__(press.compression_ratio)

    def act(self, module, layer, q_len: int) -> None:
        import torch

        # the whole layer's evicted share, all of it from head 0 (one head may keep less than another)
        count = min(q_len, round(q_len * self.compression_ratio * module.config.num_key_value_heads))
        module.masked_key_indices = (torch.zeros(count, dtype=torch.long), torch.zeros(count, dtype=torch.long),
                                     torch.arange(count))


def test_longctx_masking_press_bytes_count_the_unmasked_entries(tmp_path, monkeypatch) -> None:
    """A press that masks instead of evicting (kvpress's AdaKV) is charged for the keys and values it leaves
    visible, not for the full tensors it keeps; an appended file keeps the projections it was measured with."""
    import types

    from conftest import make_tiny_llama
    from helpers import save_tiny_base

    fake = types.ModuleType("kvpress")
    fake.SnapKVPress, fake.AdaKVPress = _KeepFirstPress, _MaskFirstPress
    monkeypatch.setitem(sys.modules, "kvpress", fake)
    model = make_tiny_llama("gqa", attn_implementation="sdpa")
    save_tiny_base(model, tmp_path / "base")
    longctx = importlib.import_module("benchmarks.longctx")
    out = tmp_path / "press.json"
    out.write_text(json.dumps({"command": "x", "retrieval": [], "perplexity": [],
                               "projections": {"name": "p", "sha256": "abc"}}))
    assert longctx.main(["--kvpress", "adakv:0.5", "--base", str(tmp_path / "base"), "--contexts", "",
                         "--ppl-contexts", "1200", "--ppl-windows", "1", "--append", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["perplexity"][0]
    heads = model.config.num_key_value_heads
    prefill = 1200 - 512
    from plugin.cache.eviction import prefill_ratio

    masked = min(prefill, round(prefill * prefill_ratio(0.5, prefill, 512) * heads))
    assert row["method"] == "kvpress-adakv"
    assert row["bytes_fraction"] == pytest.approx(1 - masked / (heads * 1200))
    assert row["bytes_fraction"] < 0.99  # a real share is masked, and not charged
    assert result["projections"] == {"name": "p", "sha256": "abc"}


def test_decode_memory_refuses_an_unsupported_bit_width_before_any_work(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.decode_memory", "--quant-bits", "3", "--work-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "stores 2, 4 or 8 bits" in proc.stderr
    assert not list(tmp_path.iterdir())  # no prefill written


@pytest.mark.slow
def test_scale_sim_quick(tmp_path, docs_untouched):
    """Every stage of the 7B-path simulation on a small shape: ZeRO-3 training on 2 processes included."""
    _run("scale_sim.py", "--work-dir", str(tmp_path), timeout=600)
    result = json.loads((tmp_path / "scale.json").read_text())["shapes"]["quick"]
    measured = result["measured"]
    train = measured["train"]
    assert len(train["peak_rss_gb_per_process"]) == 2 and all(x > 0.1 for x in train["peak_rss_gb_per_process"])
    assert train["bases_identical_across_processes"] and train["orthogonality_error"] < 1e-5
    assert measured["evaluate"]["cache_bytes_per_token"] == measured["evaluate"]["full_cache_bytes_per_token"] / 2
    assert measured["search"]["evaluations"] < measured["search"]["exact_evaluations"]  # fast mode did less
    # the implied 32-layer figures are the analytic counts of the shape, not measurements
    implied = result["implied"]
    assert implied["trainable_projection_params_million"] == round(4 * 2 * (2 * 64 * 64 + 64) / 1e6, 1)
    assert "| quick | train, ZeRO-3 x2 |" in (tmp_path / "scale.md").read_text()


def test_gpu_check_runs_its_stages_on_cpu(tmp_path, docs_untouched):
    """The GPU script's Python on a tiny model (--device cpu --quick): every stage runs and reports."""
    _run("gpu_check.py", "--device", "cpu", "--out", str(tmp_path / "g.json"))
    result = json.loads((tmp_path / "g.json").read_text())
    checks = result["correctness"]
    assert checks["teacher_bit_exact"] is True  # bf16, SDPA: the teacher path is the base model
    assert checks["cache_bytes_50pct"] == checks["cache_bytes_expected_50pct"]
    assert result["training"]["bases_dtype"] == "float32" and result["training"]["orthogonality_error"] < 1e-5
    settings = {(row["setting"], row["context"], row["batch"]) for row in result["decode"]}
    assert settings == {(s, c, 1) for s in ("full", "0.5", "0.25") for c in (64, 128)} | {
        (s, 64, 2) for s in ("full", "0.5", "0.25")}
    assert all(row["tokens_per_s"] > 0 for row in result["decode"])


def test_tiered_quick_compares_at_equal_measured_bytes(tmp_path, docs_untouched):
    _run("tiered.py", "--work-dir", str(tmp_path))
    rows = {row["setting"].split()[0]: row for row in json.loads((tmp_path / "tiered.json").read_text())["rows"]}
    assert set(rows) == {"full", "uniform", "tiered"}
    assert rows["tiered"]["cache_bytes"] == rows["uniform"]["cache_bytes"] == rows["full"]["cache_bytes"] / 4
    assert all(row["ppl"] > 1 for row in rows.values())


def test_key_space_compares_pre_and_post_rope_keys_on_the_same_tokens(tmp_path) -> None:
    """benchmarks/key_space.py end to end on a tiny model: rows per (model, budget, protocol) with intervals
    against the full cache, the pair at the shared budget, and decode speed rows."""
    import shutil

    from conftest import make_tiny_llama
    from helpers import save_tiny_base, to_pca

    from benchmarks.key_space import main as key_space
    from benchmarks.key_space import render

    base = make_tiny_llama("gqa", attn_implementation="sdpa")
    save_tiny_base(base, tmp_path / "base")
    for space in ("pre-rope", "post-rope"):
        to_pca(base, key_space=space).save_pretrained(tmp_path / space)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(tmp_path / "base" / name, tmp_path / space / name)
    out = tmp_path / "key_space.json"
    assert key_space(["--model", f"pre={tmp_path / 'pre-rope'}@0.5,0.25", "--model", f"post={tmp_path / 'post-rope'}@0.5",
                      "--contexts", "96", "--windows", "2", "--short-tokens", "1024", "--score-last", "32",
                      "--decode-context", "64", "--decode-steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["model"], r["budget"], r["protocol"]): r for r in result["rows"]}
    assert set(rows) == {(m, b, p) for m, b in (("pre", 0.5), ("pre", 0.25), ("post", 0.5))
                         for p in ("512 windows", "last 32 after 96")}
    assert rows[("pre", 0.5, "last 32 after 96")]["key_space"] == "pre-rope"
    assert rows[("post", 0.5, "512 windows")]["bytes_ratio"] == rows[("pre", 0.5, "512 windows")]["bytes_ratio"] == 0.5
    assert all(r["vs_full"]["low"] <= r["vs_full"]["ratio"] <= r["vs_full"]["high"] for r in rows.values())
    assert {(p["first"], p["second"], p["budget"]) for p in result["pairs"]} == {("pre", "post", 0.5)}
    assert [r["setting"] for r in result["decode"]] == ["full cache", "pre", "post"]
    assert "| pre | post | 0.5 |" in render(result)
    # decode measured again alone: only the decode rows change, and the section says by which command
    assert key_space(["--model", f"pre={tmp_path / 'pre-rope'}@0.5", "--decode-only", "--decode-context", "64",
                      "--decode-steps", "2", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["rows"] == result["rows"] and [r["setting"] for r in again["decode"]] == ["full cache", "pre"]
    assert "--decode-only" in again["decode_command"] and "measured alone" in render(again)


def test_quantized_cache_bytes_count_its_full_precision_window() -> None:
    """transformers' QuantizedCache keeps its newest tokens unquantized: they count at bfloat16 beside the codes."""
    import types

    import torch

    settings = importlib.import_module("benchmarks.longctx_settings")
    quantized = (torch.zeros(64, dtype=torch.uint8), {"scale": torch.zeros(8), "shape": (1, 2, 64, 4)})  # 512 at 1 byte
    layer = types.SimpleNamespace(_quantized_keys=quantized, _quantized_values=quantized,
                                  keys=torch.zeros(1, 2, 16, 4), values=torch.zeros(1, 2, 16, 4))
    cache = types.SimpleNamespace(layers=[layer])
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=1, num_key_value_heads=2, head_dim=4))
    setting = settings.Setting("quanto 4b", "hf-quanto", model, hf_quant=("quanto", 4))
    codes, groups, residual = 2 * 64, 2 * 8, 2 * 2 * 16 * 4
    expected = (codes + 2 * 2 * groups + 2 * residual) / (2 * (2 * 512 + residual))
    assert setting.bf16_fraction(cache, 80) == pytest.approx(expected)


def test_frontier_budgets_option_limits_searches_and_rows(tmp_path, monkeypatch) -> None:
    """--budgets 1/4,1/16 --no-floors: the searches and the measured rows are those budgets' only; an unknown
    budget is refused with the list of known ones."""
    import plugin.cli
    from benchmarks import longctx

    frontier = importlib.import_module("benchmarks.longctx_frontier")
    searched, measured, calls = [], [], []

    def mkv(argv: list[str]) -> int:
        calls.append(argv)
        if "--budget" in argv:  # the per-head descent writes one table per budget
            for budget in frontier.HEAD_BUDGETS:
                frontier.head_file(budget).write_text("{}")
        else:
            searched.append(argv[argv.index("--bytes") + 1])
        return 0

    monkeypatch.setattr(frontier, "DATA", tmp_path)
    monkeypatch.setattr(plugin.cli, "main", mkv)
    assert frontier.main(["--context", "8192", "--search", "--budgets", "1/4,1/16", "--no-floors",
                          "--out", str(tmp_path / "f.json")]) == 0
    assert searched == ["0.25", "0.0625"] and not any("--head-ranks" in argv or "--budget" in argv for argv in calls)
    assert all(argv[argv.index("--out") + 1] == str(frontier.composition_file(float(argv[argv.index("--bytes") + 1]),
                                                                               8192)) for argv in calls)
    calls.clear()
    # --per-head: one greedy descent first, its tables in every search, the files in their own folder
    assert frontier.main(["--context", "8192", "--search", "--budgets", "1/4,1/16", "--no-floors", "--per-head",
                          "--out", str(tmp_path / "f.json")]) == 0
    descents = [argv for argv in calls if "--budget" in argv]
    assert len(descents) == 1 and descents[0][descents[0].index("--budget") + 1] == "0.875,0.75"
    heads = ",".join(str(frontier.head_file(b)) for b in frontier.HEAD_BUDGETS)
    searches = [argv for argv in calls if "--bytes" in argv]
    assert len(searches) == 2 and all(argv[argv.index("--head-ranks") + 1] == heads for argv in searches)
    assert all("per-head" in argv[argv.index("--out") + 1] for argv in searches)
    calls.clear()
    for budget in (0.25, 0.0625):
        frontier.composition_file(budget, 8192, variant="per-head").parent.mkdir(parents=True, exist_ok=True)
        frontier.composition_file(budget, 8192, variant="per-head").write_text("{}")
    frontier.search(8192, 2, (0.25, 0.0625), floors=False, variant="per-head")
    assert calls == []  # the tables and the files are there: nothing searched again
    # --value-cuts: the value ranks in every search, the files in a folder of their own; not with --per-head
    assert frontier.main(["--context", "8192", "--search", "--budgets", "1/4", "--no-floors", "--value-cuts",
                          "--out", str(tmp_path / "f.json")]) == 0
    assert len(calls) == 1 and calls[0][calls[0].index("--value-ranks") + 1] == frontier.VALUE_CUTS
    assert calls[0][calls[0].index("--out") + 1] == str(frontier.composition_file(0.25, 8192, variant="value-cuts"))
    assert "value-cuts" in calls[0][calls[0].index("--out") + 1]
    calls.clear()
    # --attention: the attention spread in every search, the files in a folder of their own
    assert frontier.main(["--context", "8192", "--search", "--budgets", "1/4", "--no-floors", "--attention",
                          "--out", str(tmp_path / "f.json")]) == 0
    assert len(calls) == 1 and "--attention-spread" in calls[0] and "--value-ranks" not in calls[0]
    assert calls[0][calls[0].index("--out") + 1] == str(frontier.composition_file(0.25, 8192, variant="attention"))
    calls.clear()
    with pytest.raises(SystemExit):
        frontier.main(["--context", "8192", "--search", "--per-head", "--value-cuts", "--out", str(tmp_path / "f.json")])
    with pytest.raises(SystemExit):
        frontier.main(["--context", "8192", "--search", "--value-cuts", "--attention", "--out", str(tmp_path / "f.json")])
    for budget in (0.25, 0.0625):
        frontier.composition_file(budget, 8192).parent.mkdir(parents=True, exist_ok=True)
        frontier.composition_file(budget, 8192).write_text("{}")
    monkeypatch.setattr(longctx, "main", lambda argv: measured.append(argv) or 0)
    frontier.measure(8192, False, tmp_path / "f.json", budgets=(0.25, 0.0625), floors=False)
    (args,) = measured
    assert [a.split("=")[0] for a in args if a.startswith("alloc-")] == ["alloc-1/4", "alloc-1/16"]
    assert args[args.index("--evict") + 1] == "1@4:0.25,1@4:0.0625"
    frontier.measure(8192, False, tmp_path / "f.json", budgets=(0.25, 0.0625), floors=False, narrow=True,
                     variant="per-head")
    narrow = measured[-1]
    assert all("per-head" in a for a in narrow if a.startswith("alloc-"))
    assert narrow[narrow.index("--budgets") + 1] == "" and "--quant-bits" not in narrow and "--hf-quant" not in narrow
    assert narrow[narrow.index("--evict") + 1] == "1@4:0.25,1@4:0.0625" and "--full" in narrow
    frontier.measure(8192, True, tmp_path / "f.json", budgets=(0.25,), floors=False)
    assert measured[-1][measured[-1].index("--kvpress") + 1] == "snapkv:0.25,expected-attention:0.25,pyramidkv:0.25,adakv:0.25"
    with pytest.raises(SystemExit):
        frontier.main(["--budgets", "1/5"])


def test_frontier_refuses_to_mix_two_sets_of_projections_in_one_file(tmp_path, monkeypatch) -> None:
    """A frontier file records the projections' fingerprint on its first measurement; once the shipped projections
    change, measuring or searching into it is refused with the fix, while kvpress rows and --render still run."""
    frontier = importlib.import_module("benchmarks.longctx_frontier")
    out = tmp_path / "f.json"
    assert frontier.mixed_projections(out) is None  # nothing measured yet
    out.write_text(json.dumps({"perplexity": [], "retrieval": []}))
    assert frontier.mixed_projections(out) is None  # measured before fingerprints were recorded
    out.write_text(json.dumps({"projections": {"name": frontier.MODEL, "sha256": frontier.projections_fingerprint()}}))
    assert frontier.mixed_projections(out) is None
    out.write_text(json.dumps({"projections": {"name": frontier.MODEL, "sha256": "000000000000"}}))
    assert "measure into a new --out" in frontier.mixed_projections(out)
    monkeypatch.setattr(frontier, "measure", lambda *a, **k: pytest.fail("measured into a mixed file"))
    with pytest.raises(SystemExit):
        frontier.main(["--context", "4096", "--out", str(out)])
    with pytest.raises(SystemExit):
        frontier.main(["--context", "4096", "--search", "--out", str(out)])
    # --narrow with allocator files that keep full rank: rows no projections change, measured, and the note says so
    monkeypatch.setattr(frontier, "DATA", tmp_path)
    path = frontier.composition_file(0.25, 4096)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"head_dim": 4, "key": [[4, 3]], "value": [[4, 4]]}))
    assert not frontier.full_rank(path)
    with pytest.raises(SystemExit):
        frontier.main(["--context", "4096", "--narrow", "--budgets", "1/4", "--no-floors", "--out", str(out)])
    path.write_text(json.dumps({"head_dim": 4, "key": [[4, 4]], "value": [[4, 4]]}))
    narrow = []
    monkeypatch.setattr(frontier, "measure", lambda *a, **k: narrow.append(a[6]))
    monkeypatch.setattr(frontier, "summarize", lambda result: [])
    assert frontier.main(["--context", "4096", "--narrow", "--budgets", "1/4", "--no-floors", "--out", str(out)]) == 0
    assert narrow == [True]
    note = json.loads(out.read_text())["projections"]
    assert note["sha256"] == "000000000000" and str(path.name) in note["note"] and "keep full rank" in note["note"]
    with pytest.raises(SystemExit):  # the ranks-alone and bits lines depend on the projections
        frontier.main(["--context", "4096", "--budgets", "1/4", "--no-floors", "--out", str(out)])


def test_longctx_projected_rows_hold_their_rank_budget_at_any_length() -> None:
    """A projected row's cache is sized for its window: appending the scored tokens (under 1/8 of the prompt, where
    a growing cache would keep spare capacity) leaves it holding exactly its rank budget's bytes."""
    import torch
    from conftest import make_tiny_llama
    from helpers import to_pca

    from benchmarks.longctx_settings import Setting
    from plugin.evaluation.perplexity import SCORED, last_tokens_nll

    pca = to_pca(make_tiny_llama("gqa", attn_implementation="sdpa", max_position_embeddings=8192))
    setting = Setting("tiny 0.5", "longctx", pca, 0.5)
    setting.apply()
    window = torch.randint(0, 128, (1, 9 * SCORED + 64), generator=torch.Generator().manual_seed(0))
    cache = setting.cache(window.shape[1], 0.25)
    last_tokens_nll(pca, window, cache, setting.reading(window.shape[1] - SCORED, SCORED))
    assert cache.get_seq_length() == window.shape[1]
    assert setting.bf16_fraction(cache, window.shape[1]) == 0.5
    grown = pca.model.new_cache()  # what the row held before: capacity grown by 1/8 of the prompt
    last_tokens_nll(pca, window, grown)
    assert setting.bf16_fraction(grown, window.shape[1]) > 0.5


def test_longctx_tiered_rows_hold_at_most_their_budget_at_any_length() -> None:
    """A tiered row's old segment is sized for the window: the scored tokens demoted into it after a prompt over
    8x longer (a short append, which grows a buffer by 1/8 of what it holds) leave the cache within its budget."""
    import torch
    from conftest import make_tiny_llama
    from helpers import to_pca

    from benchmarks.longctx_settings import Setting
    from plugin.cache import TieredPcaCache
    from plugin.evaluation.perplexity import SCORED, last_tokens_nll

    pca = to_pca(make_tiny_llama("gqa", attn_implementation="sdpa", max_position_embeddings=16384))
    head_dim = pca.config.head_dim
    setting = Setting("tiered", "tiered", pca, 1.0, tiered=(SCORED, head_dim))
    setting.apply()
    window = torch.randint(0, 128, (1, 12 * SCORED), generator=torch.Generator().manual_seed(0))
    total = window.shape[1]
    cache = setting.cache(total, 0.5)
    last_tokens_nll(pca, window, cache, setting.reading(total - SCORED, SCORED))
    assert cache.get_seq_length() == total
    assert setting.bf16_fraction(cache, total) <= 0.5
    grown = TieredPcaCache(SCORED, *cache.old_ranks)  # unsized: the old segment keeps 1/8 spare room
    last_tokens_nll(pca, window, grown, setting.reading(total - SCORED, SCORED))
    assert setting.bf16_fraction(grown, total) > 0.5
