"""PcaLlamaBaseModel: argument checks before loading, budgets, batch-invariant ppl scoring."""
import json

import numpy as np
import pytest

pytest.importorskip("opencompass")

from opencompass.models import HuggingFaceBaseModel

from opencompass_ext.models import PcaLlamaBaseModel
from opencompass_ext.testing import build_tiny_checkpoints

PROMPTS = [
    "The following makes sense: \nQ: how do you open a jar?\nA: twist the lid.\n",
    "Tracy didn't go home.\nQuestion: Why?\nAnswer:\nshe was tired",
    "Yes.",
    "Question: Where would you find magazines along side many other printed works?\nAnswer: \nbookstore",
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_tiny_checkpoints(str(tmp_path_factory.mktemp("oc-tiny")))


@pytest.fixture
def no_loading(monkeypatch):
    """Make any tokenizer/weight loading fail loudly: checks must happen before it."""
    def boom(*a, **k):
        raise AssertionError("tokenizer or weights were loaded before the arguments were checked")
    monkeypatch.setattr(HuggingFaceBaseModel, "_load_tokenizer", boom)
    monkeypatch.setattr(HuggingFaceBaseModel, "_load_model", boom)


@pytest.mark.parametrize("budget", [0, 1.5, -0.25, "lots", 50])
def test_bad_budget_fails_before_loading(no_loading, ckpts, budget):
    with pytest.raises(ValueError, match="kv_budget"):
        PcaLlamaBaseModel(path=ckpts[1], kv_budget=budget)


def test_missing_rank_file_fails_before_loading(no_loading, ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="rank_file"):
        PcaLlamaBaseModel(path=ckpts[1], rank_file=str(tmp_path / "missing.json"))


def test_malformed_rank_file_fails_before_loading(no_loading, ckpts, tmp_path):
    bad = tmp_path / "ranks.json"
    bad.write_text(json.dumps({"key": [[8, 8]], "value": [[8, 8]]}))  # 1 layer, model has 2
    with pytest.raises(ValueError, match="layers"):
        PcaLlamaBaseModel(path=ckpts[1], rank_file=str(bad))


def test_budget_and_rank_file_together_rejected(no_loading, ckpts, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        PcaLlamaBaseModel(path=ckpts[1], kv_budget=0.5, rank_file=str(tmp_path / "r.json"))


def test_budget_on_plain_llama_rejected(no_loading, ckpts):
    with pytest.raises(ValueError, match=r"not a PcaLlama \(pcallama, pcamistral, pcaqwen2, pcaqwen3\)"):
        PcaLlamaBaseModel(path=ckpts[0], kv_budget=0.5)


def test_budgets_and_rank_files_are_applied(ckpts, tmp_path):
    m = PcaLlamaBaseModel(path=ckpts[1], kv_budget=0.375)
    assert m.kv_budget_effective == pytest.approx(0.375)
    assert m.model.get_kv_ranks()["key"] == [[6, 6], [6, 6]]  # head_dim 16
    ranks = {"key": [[4, 8], [16, 2]], "value": [[16, 16], [8, 6]]}
    rf = tmp_path / "ranks.json"
    rf.write_text(json.dumps(ranks))
    m = PcaLlamaBaseModel(path=ckpts[1], rank_file=str(rf))
    assert m.model.get_kv_ranks() == ranks


def test_full_budget_scores_equal_base_and_are_batch_invariant(ckpts):
    base = PcaLlamaBaseModel(path=ckpts[0])
    full = PcaLlamaBaseModel(path=ckpts[1], kv_budget=1.0)
    low = PcaLlamaBaseModel(path=ckpts[1], kv_budget=0.25)
    vanilla = HuggingFaceBaseModel(path=ckpts[0], max_seq_len=2048,
                                   model_kwargs={"torch_dtype": "float32", "device_map": "cpu"})
    b_batched, f_batched = base.get_ppl(PROMPTS), full.get_ppl(PROMPTS)
    b_single = np.array([base.get_ppl([p])[0] for p in PROMPTS])
    v_single = np.array([vanilla.get_ppl([p])[0] for p in PROMPTS])
    # OpenCompass's own number at batch size 1 (no padding) is reproduced exactly
    np.testing.assert_array_equal(b_single, v_single)
    # padding does not change a prompt's score (OpenCompass's get_ppl does change it)
    np.testing.assert_allclose(b_batched, b_single, rtol=0, atol=1e-5)
    # 100% budget = the uncompressed model (random orthogonal bases, up to float rounding)
    np.testing.assert_allclose(f_batched, b_batched, rtol=0, atol=1e-5)
    # a real compression changes the scores
    assert np.abs(low.get_ppl(PROMPTS) - b_batched).max() > 1e-3
    # loglikelihood path (mask_length) also agrees with OpenCompass at batch size 1
    ml = [1] * len(PROMPTS)
    np.testing.assert_allclose(
        base.get_ppl(PROMPTS, ml), [vanilla.get_ppl([p], [1])[0] for p in PROMPTS],
        rtol=0, atol=1e-5)


def test_generation_works(ckpts):
    m = PcaLlamaBaseModel(path=ckpts[1], kv_budget=0.5)
    out = m.generate(["Question: Where is the bank?\nAnswer:", "Yes."], max_out_len=5)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
