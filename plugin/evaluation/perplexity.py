"""Perplexity of a model on fixed token windows, and sweeps over KV budgets."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def window_token_nlls(
    model: Any, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> torch.Tensor:
    """Next-token NLL of every predicted token of every window (rows of one length), float64, window by window."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    # A quantized cache only acts through the cache: score each window through a fresh one, so every
    # token attends to the dequantized states of the window (as decoding would, past the recent tail).
    quantized = getattr(model, "get_kv_bits", lambda: None)() is not None
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=quantized).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        parts.append(nll.double().cpu())
    model.train(was_training)
    return torch.cat(parts)


def token_nll(
    model: Any, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over every window (rows of one length)."""
    nll = window_token_nlls(model, windows, batch_size, progress, desc)
    return float(nll.sum()), nll.numel()


def perplexity(
    model: Any, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    total_nll, total_tokens = token_nll(model, windows, batch_size, progress, desc)
    return math.exp(total_nll / total_tokens)


def budget_sweep(
    model: Any,
    windows: torch.Tensor,
    budgets: Sequence[float] = (),
    rank_files: Sequence[str] = (),
    batch_size: int = 4,
    progress: bool = True,
    label: str | None = None,
) -> list[dict[str, Any]]:
    """Perplexity at each uniform budget and each rank file, with cache bytes per token."""
    settings: list[tuple[str, Any]] = [("budget", b) for b in budgets] + [("rank_file", f) for f in rank_files]
    rows = []
    full_bytes = model.full_cache_bytes_per_token()
    initial = model.get_kv_bits() if hasattr(model, "get_kv_bits") else None
    for kind, value in settings:
        _restore_bits(model, initial)  # a rank file's bits apply to its own row only
        if kind == "budget":
            model.set_kv_budget(value)
        else:
            model.load_rank_file(value)  # may carry bit widths (mkv search-budget --bytes)
        spec = model.get_kv_bits() if hasattr(model, "get_kv_bits") else None
        bits = "16" if spec is None else _bits_label(spec)
        start = time.perf_counter()
        ppl = perplexity(model, windows, batch_size, progress, desc=f"{label or 'model'} @ {value} x {bits} bits")
        bytes_per_token = model.kv_cache_bytes_per_token()
        rows.append(
            {
                "model": label,
                "setting": (f"{value:g}" if kind == "budget" else str(value)) + ("" if bits == "16" else f" x{bits}b"),
                "kv_bits": bits,
                "budget": round(model.kv_budget(), 6),
                "perplexity": ppl,
                "cache_bytes_per_token": bytes_per_token,
                "full_cache_bytes_per_token": full_bytes,
                "cache_ratio": bytes_per_token / full_bytes,
                # against a bfloat16 full cache (scales and zeros stay float16): the frontier's x axis
                "bf16_ratio": model.kv_cache_bytes_per_token(torch.bfloat16)
                / model.full_cache_bytes_per_token(torch.bfloat16),
                "seconds": time.perf_counter() - start,
            }
        )
    _restore_bits(model, initial)
    return rows


def _restore_bits(model: Any, spec: Any) -> None:
    if hasattr(model, "set_kv_quant"):
        model.set_kv_quant(spec)


def _bits_label(spec: Any) -> str:
    """'4' for uniform 4-bit keys and values, '4/2' for 4-bit keys and 2-bit values, 'mixed' otherwise."""
    keys = {b for row in spec.key_bits for b in row}
    values = {b for row in spec.value_bits for b in row}
    if len(keys) == 1 and len(values) == 1:
        k, v = keys.pop(), values.pop()
        return str(k) if k == v else f"{k}/{v}"
    return "mixed"


# -- long context: the last tokens of long windows, read through the setting's cache ---------------------------
SCORED = 512


@torch.no_grad()
def last_tokens_nll(model: Any, ids: torch.Tensor, cache: Any = None, reading: Any = None,
                    scored: int = SCORED) -> torch.Tensor:
    """Per-token NLL (float64 ``[scored]``) of the last `scored` tokens of ``ids`` [1, T].

    The tokens before them are read into `cache` first (a fresh cache; None: the model's own), inside
    `reading` (a context manager around that prefill, e.g. a token eviction), then the `scored` tokens go
    through the cache in one forward at their true positions (a cache that evicted tokens holds fewer).
    """
    import contextlib

    context = ids.shape[1] - scored
    if context < 1:
        raise ValueError(f"a window of {ids.shape[1]} tokens has no context before its last {scored}")
    with reading or contextlib.nullcontext():
        out = model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
    first, cache = out.logits[:, -1:], out.past_key_values
    positions = torch.arange(context, ids.shape[1], device=ids.device)[None]
    if _ragged(model, cache):
        # transformers builds one causal mask from layer 0's length; a layer holding fewer tokens slices it to its
        # own length and would let each scored token see the ones after it. One token at a time needs no mask.
        rest = torch.cat([model(input_ids=ids[:, t : t + 1], past_key_values=cache, position_ids=positions[:, i : i + 1],
                                use_cache=True).logits for i, t in enumerate(range(context, ids.shape[1]))], dim=1)
    else:
        rest = model(input_ids=ids[:, context:], past_key_values=cache, position_ids=positions, use_cache=True).logits
    logits = torch.cat([first, rest[:, :-1]], dim=1).float()[0]
    return torch.nn.functional.cross_entropy(logits, ids[0, context:], reduction="none").double().cpu()


def _ragged(model: Any, cache: Any) -> bool:
    """Whether `cache`'s layers hold different numbers of tokens (per-layer eviction, e.g. PyramidKV) under
    attention layers that take transformers' shared mask as it is (the project's own rebuild it per layer)."""
    layers = model.get_decoder().layers
    if all(getattr(layer.self_attn, "masks_own_cache_length", False) for layer in layers):
        return False
    return len({cache.get_seq_length(i) for i in range(len(layers))}) > 1


def long_context_nll(model: Any, windows: torch.Tensor, scored: int = SCORED, progress: bool = True,
                     desc: str = "long context", cache_for: Any = None, reading_for: Any = None) -> torch.Tensor:
    """Per-token NLL of the last `scored` tokens of every window ``[n, T]``, concatenated (``[n * scored]``).

    `cache_for()` makes each window's fresh cache (default: the model's own); `reading_for()` the context
    manager around its prefill (default: none)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for row in tqdm(windows, desc=desc, disable=not progress, leave=False):
        cache = cache_for() if cache_for is not None else None
        reading = reading_for() if reading_for is not None else None
        parts.append(last_tokens_nll(model, row[None].to(device), cache, reading, scored))
    model.train(was_training)
    return torch.cat(parts)


def long_context_sweep(
    model: Any,
    windows: dict[int, torch.Tensor],
    budgets: Sequence[float] = (),
    rank_files: Sequence[str] = (),
    scored: int = SCORED,
    label: str | None = None,
    reference: dict[int, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], torch.Tensor]]:
    """Last-`scored`-token perplexity after each context of `windows` ({length: [n, length]}) at each budget and
    rank file; with `reference` ({length: per-token NLL of the full cache}) each row carries its ratio to it and
    the paired bootstrap interval. Returns the rows and the per-token NLLs by (setting, length)."""
    from .intervals import paired_ratio

    settings: list[tuple[str, Any]] = [("budget", b) for b in budgets] + [("rank_file", f) for f in rank_files]
    rows, nlls = [], {}
    initial = model.get_kv_bits() if hasattr(model, "get_kv_bits") else None
    for kind, value in settings:
        _restore_bits(model, initial)
        if kind == "budget":
            model.set_kv_budget(value)
        else:
            model.load_rank_file(value)
        spec = model.get_kv_bits() if hasattr(model, "get_kv_bits") else None
        bits = "16" if spec is None else _bits_label(spec)
        name = (f"{value:g}" if kind == "budget" else str(value)) + ("" if bits == "16" else f" x{bits}b")
        for length, rows_of_length in windows.items():
            start = time.perf_counter()
            nll = long_context_nll(model, rows_of_length, scored, progress, desc=f"{label or 'model'} @ {name}, {length}")
            nlls[(name, length)] = nll
            row = {"model": label, "setting": name, "kv_bits": bits, "budget": round(model.kv_budget(), 6),
                   "context": length, "windows": int(rows_of_length.shape[0]), "scored_tokens": int(nll.numel()),
                   "perplexity": math.exp(float(nll.mean())),
                   "cache_bytes_per_token": model.kv_cache_bytes_per_token(),
                   "cache_ratio": model.kv_cache_bytes_per_token() / model.full_cache_bytes_per_token(),
                   "seconds": time.perf_counter() - start}
            if reference is not None and length in reference:
                row["vs_full"] = paired_ratio(nll, reference[length]).as_dict()
            rows.append(row)
    _restore_bits(model, initial)
    return rows, nlls
