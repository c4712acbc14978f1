"""Pass-key retrieval through OpenCompass (configs/pcallama_longctx.py, gen mode, offline)."""
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opencompass_ext.longctx import PassKeyDataset, PassKeyEvaluator, passkey_datasets
from opencompass_ext.testing import build_tiny_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "pcallama_longctx.py")


def test_evaluator_scores_the_first_five_digit_number():
    result = PassKeyEvaluator().score([" 48213.", "It is 12345 or 48213", "no idea", "48213 again"],
                                      ["48213", "48213", "48213", "48213"])
    assert result["accuracy"] == 50.0
    assert [d["correct"] for d in result["details"]] == [True, False, False, True]
    assert "error" in PassKeyEvaluator().score(["1"], [])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("oc-longctx")
    llama, pca = build_tiny_checkpoints(str(root))
    return {"root": root, "llama": llama, "pca": pca}


def test_dataset_holds_the_items_of_its_depth(tiny):
    from transformers import AutoTokenizer

    from plugin.evaluation.retrieval import passkey_items
    from plugin.storage.texts import load_texts

    depths = [0.0, 0.5, 1.0]
    data = PassKeyDataset.load(tiny["pca"], context=128, depth=0.5, per_depth=3, depths=depths)
    items = passkey_items(AutoTokenizer.from_pretrained(tiny["pca"]), load_texts(None, split="evaluation"), 128,
                          depths, 3)
    expected = [(i.prompt, i.key) for i in items if i.depth == 0.5]
    assert [(r["prompt"], r["answer"]) for r in data["test"]] == expected and len(expected) == 3
    with pytest.raises(ValueError, match="not one of depths"):
        PassKeyDataset.load(tiny["pca"], context=128, depth=0.3, depths=depths)
    entries = passkey_datasets(tiny["pca"], [128, 256], depths)
    assert [e["abbr"] for e in entries][:3] == ["passkey-128-d0.00", "passkey-128-d0.50", "passkey-128-d1.00"]
    assert all(e["infer_cfg"]["inferencer"]["type"].endswith("GenInferencer") for e in entries)


def _opencompass():
    exe = os.path.join(os.path.dirname(sys.executable), "opencompass")
    return [exe] if os.path.exists(exe) else [shutil.which("opencompass") or "opencompass"]


@pytest.mark.slow
def test_opencompass_generates_and_scores_by_depth(tiny, tmp_path):
    """The real CLI in debug mode: one row per (context, depth); at 100% every answer equals the base model's."""
    env = dict(os.environ, MKV_MODEL=tiny["pca"], MKV_BASE_MODEL=tiny["llama"], MKV_BUDGETS="100,50",
               MKV_PASSKEY_CONTEXTS="128", MKV_PASSKEY_DEPTHS="0,1", MKV_PASSKEY_PER_DEPTH="2",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MKV_RANK_FILE", None)
    work = tmp_path / "out"
    proc = subprocess.run(_opencompass() + [CONFIG, "--debug", "-w", str(work)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = Path(max(glob.glob(str(work / "*" / "summary" / "summary_*.csv")))).read_text()
    for abbr in ("passkey-128-d0.00", "passkey-128-d1.00"):
        assert abbr in text
    for model in ("base-uncompressed", "pcallama-100%", "pcallama-50%"):
        assert model in text.splitlines()[0]
    predictions = {}
    for path in glob.glob(str(work / "*" / "predictions" / "*" / "passkey-*.json")):
        model = os.path.basename(os.path.dirname(path))
        rows = json.loads(Path(path).read_text())
        predictions.setdefault(model, {}).update({(os.path.basename(path), k): v["prediction"] for k, v in rows.items()})
    assert set(predictions) == {"base-uncompressed", "pcallama-100%", "pcallama-50%"}
    assert len(predictions["base-uncompressed"]) == 4
    assert predictions["pcallama-100%"] == predictions["base-uncompressed"]


def test_the_default_model_is_the_shipped_projections_written_once(tmp_path, monkeypatch):
    from opencompass_ext import suite

    with pytest.raises(ValueError, match="embedded-matryoshka"):
        suite.shipped_checkpoint("no-such-projections")
    import shutil

    from plugin.storage import assets

    shutil.copytree(assets.embedded_model_dir(), tmp_path / assets.MODEL_SUBDIR)  # the base, not rebuilt here
    monkeypatch.setenv("MKV_CACHE_DIR", str(tmp_path))
    path = suite.shipped_checkpoint()
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["model_type"] == "pcallama" and (Path(path) / "tokenizer.json").is_file()
    written = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert suite.shipped_checkpoint() == path  # the second call reuses it
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == written
    assert not [p.name for p in Path(path).parent.iterdir() if p.name.startswith(".tmp")]
