"""Smoke tests of the benchmark scripts: each runs with --quick as a subprocess (tiny checkpoints in
temp dirs, nothing written to docs/) and must exit 0 and write well-formed JSON / PNG files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def docs_untouched():
    """--quick must not write into docs/."""
    docs = REPO / "docs"
    before = {p: p.stat().st_mtime_ns for p in docs.rglob("*")} if docs.exists() else {}
    yield
    after = {p: p.stat().st_mtime_ns for p in docs.rglob("*")} if docs.exists() else {}
    assert after == before, "a --quick run changed docs/"


def test_decode_memory_quick(docs_untouched):
    proc = _run("decode_memory.py")
    assert "decode_memory quick run ok" in proc.stdout
    png = Path(proc.stdout.split("decode_memory quick run ok: ")[1].split()[0])
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_quality_quick(tmp_path, docs_untouched):
    proc = _run("quality.py", "--work-dir", str(tmp_path))
    assert "quality quick run ok" in proc.stdout
    result = json.loads((tmp_path / "quality.json").read_text())
    models = {row["model"] for row in result["rows"]}
    assert {"full", "pca", "matryoshka", "matryoshka-searched", "weight-pca", "weight-pca-shared",
            "svd-latent"} <= models
    for row in result["rows"]:
        assert row["perplexity"] > 1 and row["cache_bytes_per_token"] > 0
        assert abs(row["cache_ratio"] - row["cache_bytes_per_token"] / row["full_cache_bytes_per_token"]) < 1e-9
    searched = [r for r in result["rows"] if r["model"] == "matryoshka-searched" and r["setting"].endswith(".json")]
    assert sorted(round(r["budget"], 3) for r in searched) == [0.375, 0.5]
    assert (tmp_path / "quality.png").read_bytes()[:8] == PNG_MAGIC
    for name in ("ranks-0.5.json", "ranks-0.375.json"):
        assert (tmp_path / name).is_file()


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
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_training_cost_quick(tmp_path, docs_untouched):
    proc = _run("training_cost.py", "--work-dir", str(tmp_path))
    assert "training_cost quick run ok" in proc.stdout
    result = json.loads((tmp_path / "training_cost.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"distill", "stock-full"}
    for row in rows.values():
        assert row["s_per_step"] and row["s_per_step"] > 0 and row["peak_rss_mib"] > 50
    assert rows["distill"]["ratio_to_distill"] == 1.0
    assert (tmp_path / "training_cost.png").read_bytes()[:8] == PNG_MAGIC


def test_run_all_rejects_unknown_benchmark():
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "nope"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "unknown benchmark" in proc.stderr
