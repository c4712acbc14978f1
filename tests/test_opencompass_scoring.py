"""Prefix-sharing scoring: the same numbers as one forward per prompt, with less work."""
import json

import numpy as np
import pytest

pytest.importorskip("opencompass")

from opencompass_ext import datasets as ds
from opencompass_ext.models import PcaLlamaBaseModel
from opencompass_ext.scoring import PrefixScorer, common_prefix_length
from opencompass_ext.testing import build_tiny_checkpoints

SHOTS = "Question: Where would you find magazines?\nAnswer: bookstore\n" * 3
GROUPS = [
    [SHOTS + "Question: How do you open a jar?\nAnswer: " + c for c in ("twist the lid", "hit it", "a")],
    [SHOTS + "Question: Is it legal tender?\nAnswer: " + c for c in ("Yes", "No")],  # shares the shots
    ["Tracy didn't go home.\nQuestion: Why?\nAnswer:" + c for c in (" she was tired", " economy", " the nation")],
    ["Yes.", "Yes. No."],  # one prompt is a prefix of the other
    ["same prompt", "same prompt"],
    ["", "a"],  # a bare BOS scores 0
    [SHOTS + "Question: Where is the bank?\nAnswer: " + c for c in ("river", "town")],  # shots again after a reset
]
MIXED_RANKS = {"key": [[4, 16], [10, 2]], "value": [[16, 6], [2, 12]]}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_tiny_checkpoints(str(tmp_path_factory.mktemp("oc-scoring")))


@pytest.fixture(scope="module")
def models(ckpts, tmp_path_factory):
    rank_file = tmp_path_factory.mktemp("ranks") / "ranks.json"
    rank_file.write_text(json.dumps(MIXED_RANKS))
    return {"llama": PcaLlamaBaseModel(path=ckpts[0]),
            "full": PcaLlamaBaseModel(path=ckpts[1], kv_budget=1.0),
            "low": PcaLlamaBaseModel(path=ckpts[1], kv_budget=0.25),
            "mixed": PcaLlamaBaseModel(path=ckpts[1], rank_file=str(rank_file))}


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


@pytest.mark.parametrize("name", ["llama", "full", "low", "mixed"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_scores_equal_one_prompt_at_a_time(models, name, attn):
    model = models[name]
    model.model.config._attn_implementation = attn
    try:
        grouped = model.get_ppl_grouped(GROUPS)
        for group, scores in zip(GROUPS, grouped):
            alone = [model.get_ppl([prompt])[0] for prompt in group]
            np.testing.assert_allclose(scores, alone, rtol=0, atol=2e-6)
    finally:
        model.model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("name", ["low", "mixed"])
def test_left_padding_does_not_change_a_compressed_score(models, name):
    """Below full rank projected keys are not shift-invariant under RoPE: padded prompts must keep their positions."""
    model = models[name]
    prompts = [p for group in GROUPS[:4] for p in group]
    batched = model.get_ppl(prompts)
    alone = [model.get_ppl([p])[0] for p in prompts]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=2e-6)


def test_shared_prefixes_run_once(models):
    """The scorer feeds each shared token once: the shots of the second item are not run again."""
    model = models["mixed"]
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        scorer = PrefixScorer(model.model)
        ids = [[model.tokenizer(p)["input_ids"] for p in group] for group in GROUPS[:2]]
        scorer.score(ids[0])
        first = sum(seen)
        scorer.score(ids[1])
        second = sum(seen) - first
    finally:
        handle.remove()
    naive = sum(len(s) for s in ids[1])
    shots = common_prefix_length(ids[0][0], ids[1][0])
    assert shots > 20
    # item 2 runs its own question and answers, never the shots again
    assert second <= naive - len(ids[1]) * shots + len(ids[1]) * 2
    assert first < sum(len(s) for s in ids[0])


@pytest.fixture(scope="module")
def quick_suite():
    try:
        ds.prepare()
    except ds.SuiteError as err:
        pytest.skip(f"offline suite unavailable: {err}")


def test_prefix_sharing_inferencer_matches_ppl_inferencer(quick_suite, ckpts):
    """Same predictions and scores as OpenCompass's PPLInferencer on every offline set (quick suite)."""
    from opencompass_ext.bench import run

    rows = run(ckpts[1], 0.375, ["csqa", "piqa", "obqa", "siqa", "boolq"], 8, [4], suite="quick")
    assert len(rows) == 5
    for row in rows:
        assert row["items"] > 0
        assert row["same_predictions"] == row["items"], row
        assert row["max_score_diff"] < 2e-6, row
