"""Paired bootstrap intervals for perplexity ratios measured on the same tokens.

Two settings scored on the same tokens give per-token NLLs ``a`` and ``b``; their perplexity ratio is
``exp(mean(a) - mean(b))``. Neighbouring tokens are not independent, so the tokens are cut into
consecutive blocks (64 tokens by default, never across windows when the block divides the scored
tokens of a window) and the blocks are resampled with replacement, the same blocks for both settings
(paired). The 2.5th and 97.5th percentiles of the resampled ratios bound the 95% interval; a
difference is a win or a loss only when that interval excludes 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """A paired statistic (a perplexity ratio, or a difference of accuracies) and its bootstrap interval.

    ``null`` is the value of no difference: 1 for ratios, 0 for differences."""

    ratio: float
    low: float
    high: float
    blocks: int
    null: float = 1.0

    def verdict(self) -> str:
        """'lower' (the interval lies below the null), 'higher' (above it) or 'tie' (it includes the null).

        For a perplexity ratio 'lower' is a win; for a difference of accuracies 'higher' is."""
        if self.high < self.null:
            return "lower"
        if self.low > self.null:
            return "higher"
        return "tie"

    def text(self, digits: int = 2) -> str:
        return f"{self.ratio:.{digits}f}x ({self.low:.{digits}f}-{self.high:.{digits}f})"

    def as_dict(self) -> dict[str, float | int | str]:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "blocks": self.blocks,
                "verdict": self.verdict()}


def block_sums(nll: torch.Tensor, block: int) -> torch.Tensor:
    """Sums of consecutive `block`-token blocks of a 1-D NLL vector (a shorter last block kept as it is)."""
    if nll.dim() != 1 or nll.numel() == 0:
        raise ValueError(f"per-token NLLs must be a non-empty 1-D tensor; got shape {tuple(nll.shape)}")
    if block < 1:
        raise ValueError(f"the bootstrap block must be >= 1 token; got {block}")
    full = nll.numel() // block * block
    sums = nll[:full].double().view(-1, block).sum(-1)
    if full < nll.numel():
        sums = torch.cat([sums, nll[full:].double().sum().view(1)])
    return sums


def paired_ratio(nll: torch.Tensor, reference: torch.Tensor, block: int = 64, samples: int = 4000,
                 seed: int = 0, confidence: float = 0.95) -> Interval:
    """perplexity(nll) / perplexity(reference) with its paired block-bootstrap interval."""
    if nll.shape != reference.shape:
        raise ValueError(f"paired NLLs need the same tokens; got shapes {tuple(nll.shape)} and {tuple(reference.shape)}")
    counts = block_sums(torch.ones_like(nll, dtype=torch.float64), block)
    return blocks_ratio(block_sums(nll, block), block_sums(reference, block), counts, samples, seed, confidence)


def blocks_ratio(blocks: torch.Tensor | list[float], reference: torch.Tensor | list[float],
                 counts: torch.Tensor | list[float], samples: int = 4000, seed: int = 0,
                 confidence: float = 0.95) -> Interval:
    """The same from per-block NLL sums and token counts (what a results file keeps instead of every token)."""
    blocks, reference, counts = (torch.as_tensor(t, dtype=torch.float64) for t in (blocks, reference, counts))
    if blocks.shape != reference.shape or blocks.shape != counts.shape or blocks.dim() != 1:
        raise ValueError("paired blocks need the same blocks for both settings")
    diff = blocks - reference
    ratio = float(torch.exp(diff.sum() / counts.sum()))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, diff.numel(), (samples, diff.numel()), generator=generator)
    resampled = torch.exp(diff[picks].sum(-1) / counts[picks].sum(-1))
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(resampled, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(ratio, low, high, diff.numel())


def paired_difference(scores: torch.Tensor | list[float], reference: torch.Tensor | list[float], samples: int = 4000,
                      seed: int = 0, confidence: float = 0.95) -> Interval:
    """mean(scores) - mean(reference) over the same items (e.g. pass-key answers right = 1), items resampled."""
    scores, reference = (torch.as_tensor(t, dtype=torch.float64) for t in (scores, reference))
    if scores.shape != reference.shape or scores.dim() != 1 or scores.numel() == 0:
        raise ValueError("a paired difference needs the same non-empty list of items for both settings")
    diff = scores - reference
    picks = torch.randint(0, diff.numel(), (samples, diff.numel()), generator=torch.Generator().manual_seed(seed))
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(diff[picks].mean(-1), torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(float(diff.mean()), low, high, diff.numel(), null=0.0)


def paired_share(scores: torch.Tensor | list[float], reference: torch.Tensor | list[float], samples: int = 4000,
                 seed: int = 0, confidence: float = 0.95) -> Interval:
    """sum(scores) / sum(reference) over the same items (e.g. the share of the full cache's right pass-key answers
    a setting keeps), items resampled; resamples where the reference sums to 0 are left out."""
    scores, reference = (torch.as_tensor(t, dtype=torch.float64) for t in (scores, reference))
    if scores.shape != reference.shape or scores.dim() != 1 or float(reference.sum()) == 0:
        raise ValueError("a paired share needs the same list of items for both settings, the reference right on one")
    picks = torch.randint(0, scores.numel(), (samples, scores.numel()), generator=torch.Generator().manual_seed(seed))
    base = reference[picks].sum(-1)
    shares = scores[picks].sum(-1)[base > 0] / base[base > 0]
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(shares, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(float(scores.sum() / reference.sum()), low, high, scores.numel(), null=1.0)
