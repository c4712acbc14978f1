"""The `mkv` console script and the import hook, run as fresh processes of the venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _mkv() -> list[str]:
    exe = BIN / "mkv"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mkv")
    return [found] if found else [sys.executable, "-m", "plugin.cli"]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MKV_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, check=False, capture_output=True, text=True, env=env,
                          cwd=tmp_path,
                          timeout=300)


def test_mkv_help(tmp_path):
    res = _run([*_mkv(), "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    for word in ("info", "demo", "examples:"):
        assert word in res.stdout


@pytest.mark.parametrize("command", ["info", "demo"])
def test_subcommand_help_has_examples(tmp_path, command):
    res = _run([*_mkv(), command, "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "examples:" in res.stdout and f"mkv {command}" in res.stdout


def test_mkv_info(tmp_path):
    res = _run([*_mkv(), "info"], tmp_path)
    assert res.returncode == 0, res.stderr
    for word in ("python", "torch", "transformers", "device", "evaluation", "not built"):
        assert word in res.stdout, res.stdout


def test_bad_input_is_one_line_error(tmp_path):
    res = _run([*_mkv(), "demo", "--split", "nope"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("mkv: error: unknown corpus split 'nope'")
    assert "Traceback" not in res.stderr


def test_import_hook_pth_is_active(tmp_path):
    """The installed matryoshka_kv_hook.pth loads the hook in every interpreter of the venv."""
    code = "import sys; print('plugin.model.import_hook' in sys.modules)"
    res = _run([sys.executable, "-c", code], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


def test_demo_perplexity_scores_whole_and_partial_windows() -> None:
    import math

    import torch
    from conftest import make_tiny_llama

    from plugin.commands.demo import windowed_perplexity

    model = make_tiny_llama("gqa").eval()
    ids = torch.randint(0, 128, (23,), generator=torch.Generator().manual_seed(0))
    ppl, scored = windowed_perplexity(model, ids, window=8)  # windows of 8, 8 and a partial 7
    nll = 0.0
    with torch.no_grad():
        for start in (0, 8, 16):
            chunk = ids[start:start + 8][None]
            logits = model(chunk).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
    assert scored == 7 + 7 + 6
    assert math.isclose(ppl, math.exp(nll / scored), rel_tol=1e-5)
    with pytest.raises(ValueError, match="increase --tokens"):
        windowed_perplexity(model, ids[:1], window=8)
