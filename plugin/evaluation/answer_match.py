"""Do two answers say the same thing?  Word-level ROUGE-L and a threshold calibrated on the model itself.

Equal first sentences are too strict a rule for a small model: its greedy continuation forks on the
first slightly changed logit and then says the same thing in other words.  A softer rule needs a
threshold that is not picked by hand.  It is calibrated on two kinds of pairs the full model makes
by itself, with no compressed cache involved:

* positives, the model's own variation: its greedy answer against its sampled answers to the same
  instruction (any compressed answer as close as those says what the model would have said);
* negatives, answers that do not answer the instruction: its greedy answer against its greedy
  answer to a different instruction.

The threshold is the cut that best separates the two (Youden's J, the largest true-positive rate
minus false-positive rate); both rates are reported with it so a reader sees how sharp the rule is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l(reference: str, candidate: str) -> float:
    """F1 of the longest common word subsequence (0 when either side has no words)."""
    ref, cand = words(reference), words(candidate)
    if not ref or not cand:
        return 0.0
    previous = [0] * (len(cand) + 1)
    for token in ref:
        current = [0]
        for j, other in enumerate(cand):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Threshold:
    value: float
    true_positive_rate: float  # share of the model's own resamples at or above the threshold
    false_positive_rate: float  # share of answers to other instructions at or above it
    positives: int
    negatives: int


def calibrate_threshold(positives: Sequence[float], negatives: Sequence[float]) -> Threshold:
    """The score cut maximising TPR - FPR between `positives` (same meaning) and `negatives` (not)."""
    if not positives or not negatives:
        raise ValueError("calibrating a similarity threshold needs positive and negative pairs")
    best: Threshold | None = None
    for cut in sorted(set(positives) | set(negatives)):
        tpr = sum(s >= cut for s in positives) / len(positives)
        fpr = sum(s >= cut for s in negatives) / len(negatives)
        if best is None or tpr - fpr > best.true_positive_rate - best.false_positive_rate:
            best = Threshold(cut, tpr, fpr, len(positives), len(negatives))
    return best


def calibration_pairs(greedy: Sequence[str], samples: Sequence[Sequence[str]]) -> tuple[list[float], list[float]]:
    """(positive scores, negative scores): greedy vs its own samples; greedy vs the next instruction's greedy."""
    if len(greedy) < 2:
        raise ValueError("calibration needs answers to at least two instructions")
    positives = [rouge_l(answer, sample) for answer, drawn in zip(greedy, samples) for sample in drawn]
    negatives = [rouge_l(answer, greedy[(index + 1) % len(greedy)]) for index, answer in enumerate(greedy)]
    return positives, negatives
