"""The similarity rule for compressed-cache answers: ROUGE-L and its threshold calibrated on the model."""

from __future__ import annotations

import pytest

from plugin.evaluation.answer_match import calibrate_threshold, calibration_pairs, rouge_l


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence() -> None:
    assert rouge_l("The capital of France is Paris.", "the capital of france is paris") == 1.0
    # LCS "capital france paris" (3 words) of 6 reference and 4 candidate words: P 3/4, R 3/6
    assert rouge_l("The capital of France is Paris", "capital France: Paris, yes") == pytest.approx(
        2 * 0.75 * 0.5 / 1.25)
    assert rouge_l("Paris", "Berlin") == 0.0
    assert rouge_l("", "anything") == rouge_l("anything", "") == 0.0


def test_threshold_separates_own_resamples_from_answers_to_other_instructions() -> None:
    greedy = ["the capital of france is paris", "red blue and yellow are the primary colors",
              "seven times eight is fifty six"]
    samples = [["paris is the capital of france", "the capital of france is the city of paris"],
               ["the primary colors are red blue and yellow", "red yellow and blue"],
               ["seven times eight equals fifty six", "fifty six"]]
    positives, negatives = calibration_pairs(greedy, samples)
    assert len(positives) == 6 and len(negatives) == 3
    threshold = calibrate_threshold(positives, negatives)
    assert threshold.false_positive_rate == 0.0 and threshold.true_positive_rate >= 5 / 6
    assert max(negatives) < threshold.value <= sorted(positives)[1]
    with pytest.raises(ValueError, match="positive and negative"):
        calibrate_threshold([], [0.1])
    with pytest.raises(ValueError, match="two instructions"):
        calibration_pairs(greedy[:1], samples[:1])
