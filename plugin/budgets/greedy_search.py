"""Heterogeneous per-head KV budgets: the greedy search of the paper (Algorithm 1).

Start with every (layer, KV head, K or V) entry at full rank. Each round, try lowering every entry
by one grid step, measure KL(base || compressed) of the next-token distributions (averaged per
token) on a few calibration windows, and lower the entry whose KL is smallest. Stop at the first
state whose budget ``sum(ranks) / (2 * L * H * d)`` is at or below the target: the result is the
largest grid budget not above the target, every rank a multiple of the step in [step, d].

What makes it affordable (all exact: they change the cost, not the result):

* prefix reuse: the hidden states entering layer l do not depend on the ranks of layers >= l, so
  the inputs of every layer are cached for the current ranks and a candidate at layer l runs only
  layers l..L-1. After a round lowers an entry of layer l*, the inputs of layers <= l* stay valid
  and only layers > l* are recomputed (one partial forward). No candidate *score* stays valid: a
  candidate above l* sees new inputs, one below l* has l* in its suffix.
* candidate batching: candidates of neighbouring layers are stacked along the batch dimension and
  share one pass through the common suffix ("wavefront": a candidate joins the batch at its own
  layer, where it is run alone with its lowered rank, then travels with the others).

``mode="fast"`` (approximate) lowers the k best entries of a round at once, with
k = min(remaining steps, ceil(fraction * candidates)); it always stops at the same budget as the
exact search. docs/search.md compares both.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..model.modeling import PcaLlamaForCausalLM
from .ranks import KINDS, RankTable, check_budget, check_step, table_budget

MODES = ("exact", "fast")

#: (kind index, layer, KV head): kind 0 is the key, 1 the value.
Entry = tuple[int, int, int]


@dataclass
class SearchResult:
    """Outcome of a budget search."""

    ranks: RankTable
    budget: float
    target: float
    step: int
    mode: str
    kl: float  # KL(base || searched) per token on the search windows
    rounds: int
    evaluations: int  # candidate KL evaluations
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per round

    def summary(self) -> dict[str, Any]:
        """Scalars worth storing beside the rank table (e.g. in the rank file)."""
        mean = {kind: sum(map(sum, self.ranks[kind])) / sum(map(len, self.ranks[kind])) for kind in KINDS}
        return {
            "target": self.target,
            "step": self.step,
            "mode": self.mode,
            "kl": self.kl,
            "rounds": self.rounds,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "mean_key_rank": mean["key"],
            "mean_value_rank": mean["value"],
        }


def _as_pca_model(model: Any) -> PcaLlamaForCausalLM:
    if isinstance(model, PcaLlamaForCausalLM):
        return model
    warnings.warn(
        "searching a plain Llama model: it is wrapped with identity K/V bases, so the search ranks raw "
        "head dimensions, not PCA directions; calibrate first (`mkv calibrate`) for a meaningful result",
        stacklevel=3,
    )
    return PcaLlamaForCausalLM.from_llama(model)


def target_sum(budget: float, entries: int, head_dim: int, step: int) -> int:
    """Largest rank sum on the step grid whose budget is not above `budget` (float-safe)."""
    return math.floor(budget * entries * head_dim / step + 1e-9) * step


# Above this many candidate evaluations `--mode auto` searches in fast mode: the embedded 135M model at
# 37.5% needs ~1.6e5 (minutes on a CPU), a 7B Llama (32 layers x 32 KV heads, d = 128) ~2e7.
EXACT_EVALUATION_LIMIT = 1_000_000


def exact_cost(num_layers: int, num_kv_heads: int, head_dim: int, step: int, budget: float) -> tuple[int, int]:
    """(rounds, candidate evaluations) of an exact search from full rank down to `budget`.

    One round per grid step removed; each round scores every entry still above the lowest rank. Under
    even lowering no entry reaches the lowest rank before (levels - 2) full passes, then one more per round.
    """
    entries = 2 * num_layers * num_kv_heads
    levels = head_dim // step
    rounds = (entries * head_dim - target_sum(budget, entries, head_dim, step)) // step
    evaluations = sum(entries - max(0, r - (levels - 2) * entries) for r in range(rounds))
    return rounds, evaluations


def choose_mode(mode: str, evaluations: int) -> str:
    """`auto` -> "exact" when affordable (<= EXACT_EVALUATION_LIMIT candidate evaluations), else "fast"."""
    if mode not in ("auto", "exact", "fast"):
        raise ValueError(f"mode {mode!r} is not one of 'auto', 'exact', 'fast'")
    if mode != "auto":
        return mode
    return "exact" if evaluations <= EXACT_EVALUATION_LIMIT else "fast"


class _Evaluator:
    """Cached per-layer inputs at the current ranks and KL of candidate rank changes."""

    def __init__(self, model: PcaLlamaForCausalLM, windows: torch.Tensor, batch_candidates: int) -> None:
        self.model = model
        self.layers = list(model.model.layers)
        self.attn = model.attention_layers()
        self.batch_candidates = max(1, int(batch_candidates))
        cfg = model.config
        self.ranks = torch.full((2, cfg.num_hidden_layers, cfg.num_key_value_heads), cfg.head_dim, dtype=torch.long)
        for layer in range(cfg.num_hidden_layers):
            self._apply(layer)
        embeds = model.model.embed_tokens(windows)
        positions = torch.arange(windows.shape[1], device=windows.device).unsqueeze(0)
        # cos/sin are [1, T, d]: they broadcast over any stacked batch of candidates.
        self.position_embeddings = model.model.rotary_emb(embeds, positions)
        self.positions = positions
        self.batch = windows.shape[0]
        self.inputs: list[torch.Tensor] = [embeds]
        self.refresh(0)
        normed = model.model.norm(self.inputs[-1])
        logits = self._logits(normed)
        base = torch.log_softmax(logits, dim=-1)
        # KL = sum p log p - sum p log q and log q = z - logsumexp(z) with z = W h (lm_head has no bias),
        # so sum p log q = h . (p W) - logsumexp(z): p W is fixed, which leaves one pass over the
        # candidate's logits (the logsumexp) instead of a full log_softmax and product.
        probs = base.exp()
        self.base_negentropy = (probs * base).sum(-1)
        self.base_projection = probs @ model.lm_head.weight.to(probs.dtype)

    # -- plumbing ---------------------------------------------------------------------------
    def _apply(self, layer: int, ranks: torch.Tensor | None = None) -> None:
        ranks = self.ranks[:, layer] if ranks is None else ranks
        self.attn[layer].set_ranks(ranks[0].tolist(), ranks[1].tolist())

    def _run(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # No mask: windows are unpadded and use_cache is off, so the attention's own causal mask
        # (prepare_mask builds one, or SDPA is_causal) is exactly what LlamaModel.forward would pass.
        out = self.layers[layer](
            hidden,
            attention_mask=None,
            position_ids=self.positions,
            position_embeddings=self.position_embeddings,
        )
        return out[0] if isinstance(out, tuple) else out

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        # float32 at least (bf16 logits would swamp small KLs), float64 kept for float64 models.
        logits = self.model.lm_head(normed)
        return logits if logits.dtype == torch.float64 else logits.float()

    def _kl(self, hidden: torch.Tensor) -> float:
        normed = self.model.model.norm(hidden)
        logits = self._logits(normed)
        cross = (normed.to(logits.dtype) * self.base_projection).sum(-1) - torch.logsumexp(logits, dim=-1)
        return float((self.base_negentropy - cross).mean())

    def refresh(self, first_changed: int) -> None:
        """Recompute the inputs of layers > first_changed (those of layers <= it are unaffected)."""
        del self.inputs[first_changed + 1 :]
        for layer in range(first_changed, len(self.layers)):
            self.inputs.append(self._run(layer, self.inputs[layer]))

    def current_kl(self) -> float:
        return self._kl(self.inputs[-1])

    def lower(self, entries: Sequence[Entry], step: int) -> None:
        for kind, layer, head in entries:
            self.ranks[kind, layer, head] -= step
        for layer in sorted({layer for _, layer, _ in entries}):
            self._apply(layer)
        self.refresh(min(layer for _, layer, _ in entries))

    def _candidate_output(self, entry: Entry, step: int) -> torch.Tensor:
        """Output of the entry's layer with that entry lowered by one step (then restored)."""
        kind, layer, head = entry
        ranks = self.ranks[:, layer].clone()
        ranks[kind, head] -= step
        self._apply(layer, ranks)
        try:
            return self._run(layer, self.inputs[layer])
        finally:
            self._apply(layer)

    # -- scoring ----------------------------------------------------------------------------
    def evaluate(self, entries: Sequence[Entry], step: int, reuse_prefix: bool = True) -> list[float]:
        """KL(base || current with that one entry lowered) for each entry."""
        if not reuse_prefix:
            return [self._evaluate_full(entry, step) for entry in entries]
        order = sorted(range(len(entries)), key=lambda i: (entries[i][1], i))
        scores = [0.0] * len(entries)
        for start in range(0, len(order), self.batch_candidates):
            chunk = order[start : start + self.batch_candidates]
            for index, value in zip(chunk, self._evaluate_chunk([entries[i] for i in chunk], step)):
                scores[index] = value
        return scores

    def _evaluate_chunk(self, entries: list[Entry], step: int) -> list[float]:
        """Wavefront over the layers: each candidate joins the stacked batch at its own layer."""
        hidden: torch.Tensor | None = None
        for layer in range(entries[0][1], len(self.layers)):
            if hidden is not None:
                hidden = self._run(layer, hidden)
            joining = [self._candidate_output(e, step) for e in entries if e[1] == layer]
            if joining:
                hidden = torch.cat(([hidden] if hidden is not None else []) + joining)
        assert hidden is not None
        return [self._kl(part) for part in hidden.split(self.batch)]

    def _evaluate_full(self, entry: Entry, step: int) -> float:
        """Naive reference cost: the whole stack from the embeddings for one candidate."""
        kind, layer, head = entry
        ranks = self.ranks[:, layer].clone()
        ranks[kind, head] -= step
        self._apply(layer, ranks)
        try:
            hidden = self.inputs[0]
            for index in range(len(self.layers)):
                hidden = self._run(index, hidden)
            return self._kl(hidden)
        finally:
            self._apply(layer)

    def table(self) -> RankTable:
        return {kind: self.ranks[i].tolist() for i, kind in enumerate(KINDS)}


def _check_windows(windows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise ValueError("data_windows must be a LongTensor [n_windows, seq_len] of token ids (see plugin.storage.texts.token_windows)")
    if windows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"data_windows must hold integer token ids, got dtype {windows.dtype}")
    if int(windows.min()) < 0 or int(windows.max()) >= vocab_size:
        raise ValueError(f"data_windows hold token ids outside [0, vocab_size={vocab_size})")
    return windows.long()


@torch.no_grad()
def run_search_many(
    model: Any,
    budgets: Sequence[float],
    data_windows: torch.Tensor,
    step: int | None = None,
    mode: str = "exact",
    fraction: float = 0.25,
    batch_candidates: int = 8,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> list[SearchResult]:
    """Greedy per-(layer, KV head, K/V) rank search, one result per budget (in the order given).

    The greedy path does not depend on the target (exact mode), so the state at each budget of a
    sweep is read off one descent; in fast mode the number lowered per round is clamped so that
    each target is hit exactly, which makes the path to the first target identical to a search
    for that target alone.

    Args:
        model: a PcaLlamaForCausalLM (a plain Llama is wrapped with identity bases, with a warning).
            Its ranks, training mode and sampled ranks are restored afterwards.
        budgets: target fractions of the uncompressed cache, each in (0, 1] and >= step / head_dim.
        data_windows: LongTensor ``[n, seq_len]`` of calibration token ids, unpadded.
        step: rank grid step (default: the model's kv_rank_step, head_dim // 8); must divide head_dim.
        mode: "exact" (one entry per round, the paper's greedy) or "fast" (several per round).
        fraction: fast mode only; lower min(remaining steps, ceil(fraction * candidates)) per round.
        batch_candidates: candidates stacked into one forward (1 = one suffix pass per candidate).
        reuse_prefix: run only layers >= the candidate's layer (False: full stack, for measurement).
        progress: show a tqdm bar (steps done, with round, budget and KL).
    """
    model = _as_pca_model(model)
    cfg = model.config
    if isinstance(budgets, (int, float)):
        budgets = [budgets]
    targets = [check_budget(b) for b in budgets]
    if not targets:
        raise ValueError("give at least one budget")
    step = check_step(cfg.head_dim, cfg.kv_rank_step if step is None else step)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction {fraction!r} must be in (0, 1]")
    floor = step / cfg.head_dim
    for budget in targets:
        if budget < floor - 1e-12:
            raise ValueError(
                f"budget {budget:g} is below the smallest reachable budget step/head_dim = "
                f"{step}/{cfg.head_dim} = {floor:g}; give a larger budget or a smaller --step"
            )
    device = next(model.parameters()).device
    windows = _check_windows(data_windows, cfg.vocab_size).to(device)

    n_layers, n_heads, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    scale = 2 * n_layers * n_heads * d
    goals = {budget: target_sum(budget, 2 * n_layers * n_heads, d, step) for budget in targets}
    all_entries: list[Entry] = [(k, layer, h) for k in range(2) for layer in range(n_layers) for h in range(n_heads)]

    saved = {
        "ranks": cfg.kv_ranks,
        "training": model.training,
        "sampled": [attn.sampled_masks for attn in model.attention_layers()],
        "sampling": model.model.sampling,
    }
    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    snapshots: dict[int, tuple[RankTable, float, int, int, float]] = {}
    evaluations = 0
    try:
        model.eval()
        for attn in model.attention_layers():
            attn.sampled_masks = None  # the folded inference path, as at evaluation time
        model.model.sampling = False
        evaluator = _Evaluator(model, windows, batch_candidates)
        kl = 0.0
        total = int(evaluator.ranks.sum())
        bar = tqdm(total=(total - min(goals.values())) // step, desc=f"search-budget {mode}", unit="step",
                   disable=not progress)
        for goal in sorted(set(goals.values()), reverse=True):
            while total > goal:
                remaining = (total - goal) // step
                candidates = [e for e in all_entries if int(evaluator.ranks[e]) > step]
                scores = evaluator.evaluate(candidates, step, reuse_prefix)
                evaluations += len(candidates)
                # Stable sort: ties go to the first entry in (kind, layer, head) order.
                ranked = sorted(range(len(candidates)), key=lambda i: scores[i])
                # never past the target: every budget of a sweep is hit exactly
                count = 1 if mode == "exact" else min(remaining, math.ceil(fraction * len(candidates)))
                chosen = [candidates[i] for i in ranked[:count]]
                evaluator.lower(chosen, step)
                kl = scores[ranked[0]] if count == 1 else evaluator.current_kl()
                total -= step * len(chosen)
                history.append(
                    {"round": len(history) + 1, "lowered": [list(e) for e in chosen], "budget": total / scale, "kl": kl}
                )
                bar.update(len(chosen))
                bar.set_postfix(round=len(history), budget=f"{total / scale:.4f}", kl=f"{kl:.4g}")
            snapshots[goal] = (evaluator.table(), kl, len(history), evaluations, time.perf_counter() - started)
        bar.close()
    finally:
        if saved["ranks"] is None:
            model.set_kv_budget(1.0)
        else:
            model.set_kv_ranks(saved["ranks"])
        cfg.kv_ranks = saved["ranks"]
        for attn, masks in zip(model.attention_layers(), saved["sampled"]):
            attn.sampled_masks = masks
        model.model.sampling = saved["sampling"]
        model.train(saved["training"])
    results = []
    for budget in targets:
        ranks, kl, rounds, count, seconds = snapshots[goals[budget]]
        results.append(
            SearchResult(
                ranks=ranks, budget=table_budget(ranks, d), target=budget, step=step, mode=mode, kl=kl,
                rounds=rounds, evaluations=count, seconds=seconds, history=history[:rounds],
            )
        )
    return results


def run_search(model: Any, budget: float, data_windows: torch.Tensor, **kwargs: Any) -> SearchResult:
    """One-budget :func:`run_search_many` (same keyword options)."""
    return run_search_many(model, [budget], data_windows, **kwargs)[0]


def search_budget(
    model: Any,
    budget: float,
    data_windows: torch.Tensor,
    step: int | None = None,
    mode: str = "exact",
    **kwargs: Any,
) -> RankTable:
    """Per-head ranks for `budget` found by the greedy KL search; options as in :func:`run_search`.

    The result loads with ``model.set_kv_ranks(table)`` or, written with
    ``plugin.budgets.ranks.write_rank_file``, with ``model.load_rank_file`` / ``mkv eval --rank-file``.
    """
    return run_search(model, budget, data_windows, step=step, mode=mode, **kwargs).ranks
