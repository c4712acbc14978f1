"""Perplexity of a model on fixed token windows, and sweeps over KV budgets."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def token_nll(
    model: Any, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over every window (rows of one length)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    # A quantized cache only acts through the cache: score each window through a fresh one, so every
    # token attends to the dequantized states of the window (as decoding would, past the recent tail).
    quantized = getattr(model, "get_kv_bits", lambda: None)() is not None
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=quantized).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return total_nll, total_tokens


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
