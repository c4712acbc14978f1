"""scripts/matryoshka_recipe.yaml and matryoshka_longctx.yaml through the real ``llamafactory-cli``: 2 steps, then a
resume.

The recipe is run as a user runs it (the YAML itself, with only the model, the data and the
length shrunk to a tiny model), interrupted after 2 steps, and run again: the second run must
continue from the last checkpoint, and the held-out learning curve must be in the log history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

yaml = pytest.importorskip("yaml")
pytest.importorskip("llamafactory")

from test_llamafactory_cli import _run, env  # noqa: F401  (env is a fixture)

from llamafactory_ext.testing import SENTENCES, build_tiny_pcallama, write_tiny_datasets

RECIPES = {"recipe": REPO / "scripts" / "matryoshka_recipe.yaml", "longctx": REPO / "scripts" / "matryoshka_longctx.yaml"}

pytestmark = pytest.mark.slow


def _recipe(name: str, model: Path, data: Path, output_dir: Path, heldout: Path, max_steps: int) -> dict:
    config = yaml.safe_load(RECIPES[name].read_text())
    config.update(
        model_name_or_path=str(model), dataset_dir=str(data), output_dir=str(output_dir), cutoff_len=64,
        max_steps=max_steps, save_steps=1, eval_steps=1, logging_steps=1, warmup_steps=0,
        matryoshka_rank_choices=[4, 8, 12], matryoshka_rank_probs=[1, 2, 1], matryoshka_heldout_data=str(heldout),
        matryoshka_heldout_tokens=1024, matryoshka_heldout_budgets="0.75,0.25",
    )
    if config.get("matryoshka_heldout_context"):
        config["matryoshka_heldout_context"] = 128  # the tiny model's 256 positions: last 64 after 64
    return config


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_runs_two_steps_and_resumes(env, tmp_path, name):  # noqa: F811
    key_space = "pre-rope" if name == "longctx" else "post-rope"
    model = build_tiny_pcallama(tmp_path / "model", key_space=key_space)
    data = write_tiny_datasets(tmp_path / "data")
    # The recipe's two datasets, under their own names, from the tiny text.
    lines = (data / "tiny_pt.jsonl").read_text().splitlines()
    (data / "sotu_train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "self_chat_train.jsonl").write_text("\n".join(lines[::2]) + "\n")
    info = json.loads((data / "dataset_info.json").read_text())
    info.update({name: {"file_name": f"{name}.jsonl", "columns": {"prompt": "text"}}
                 for name in ("sotu_train", "self_chat_train")})
    (data / "dataset_info.json").write_text(json.dumps(info))
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(" . ".join(SENTENCES * 40))
    out = tmp_path / "recipe"

    rc, log = _run(env, _recipe(name, model, data, out, heldout, max_steps=2), tmp_path / "first.yaml")
    assert rc == 0, log[-4000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    curve = [row for row in first["log_history"] if "heldout_ppl_0.25" in row]
    assert [row["step"] for row in curve] == [0, 1, 2], curve
    assert all(row["heldout_ppl_0.75"] > 1.0 and row["heldout_ppl_0.25"] > 1.0 for row in curve)

    # Run again with a longer schedule: continues from checkpoint-2 instead of starting over.
    rc, log = _run(env, _recipe(name, model, data, out, heldout, max_steps=3), tmp_path / "second.yaml")
    assert rc == 0, log[-4000:]
    assert "Resuming training from" in log and "checkpoint-2" in log, log[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    steps = [row["step"] for row in state["log_history"] if "loss" in row]
    assert steps == [1, 2, 3], steps  # step 1-2 from the first run, only step 3 trained again
    assert (out / "model.safetensors").is_file() and (out / "kv_ranks.json").is_file()
    assert json.loads((out / "config.json").read_text())["kv_key_space"] == key_space
