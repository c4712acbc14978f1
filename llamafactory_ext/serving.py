"""Serving a PcaLlama through LLaMA-Factory's chat engine at a chosen KV budget.

``llamafactory-cli chat``, ``api`` and ``webchat`` all build LLaMA-Factory's ``ChatModel``, which parses
the YAML with ``get_infer_args`` and loads the model in ``HuggingfaceEngine``.  The import hook calls
:func:`check_infer_args` right after that parse (before any weights load) and :func:`apply_settings`
right after the engine has loaded the model (before it can take a request):

* ``model_name_or_path: embedded-matryoshka`` (or ``embedded``, or a projections artifact) names a model
  the way ``mkv`` does; it is replaced by a checkpoint directory written once into the cache
  (:func:`plugin.storage.loading.checkpoint_dir`);
* ``matryoshka_kv_budget`` / ``matryoshka_rank_file`` set the ranks, ``matryoshka_kv_bits`` the cache's
  bit widths: on the model, once, as ``PcaLlamaForCausalLM.set_kv_budget`` / ``load_rank_file`` /
  ``set_kv_bits`` do;
* ``matryoshka_eviction_ratio`` evicts that share of every request's prompt at prefill
  (``plugin.SnapEviction``).  It is attached to the model for the life of the engine rather than
  entered around each request: eviction only acts when a forward fills an empty cache, which happens
  once per request (every ``generate`` builds its own cache), so both mean the same, and an attachment
  that never changes is safe with ``MAX_CONCURRENT`` requests generating at once.  The engine never
  pads (one sequence per request), which eviction requires.

Anything that cannot work is refused at start-up with one line: a budget or rank file that does not
fit the model, inference keys on a model that is not a PcaLlama, and the vLLM / SGLang backends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .arguments import SERVING_FIELDS, MatryoshkaArguments

HF_BACKEND = "huggingface"
BACKEND_REASON = (
    "the compressed KV cache (ranks, bits, eviction) lives in the Hugging Face model code of PcaLlama, "
    "while vLLM and SGLang run their own attention kernels and paged cache, which know nothing of it"
)


def _config(path: Any) -> dict[str, Any] | None:
    file = Path(str(path)) / "config.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resolve_model_path(path: Any) -> str | None:
    """The checkpoint directory for a name ``mkv`` understands, or None when `path` is used as it is.

    An existing directory holding config.json, or a hub id, is left alone.
    """
    from plugin.storage.loading import EMBEDDED, SHIPPED, checkpoint_dir, holds_projections

    if not isinstance(path, str) or _config(path) is not None:
        return None
    if path in (EMBEDDED, *SHIPPED) and not os.path.exists(path):
        return str(checkpoint_dir(path))
    if os.path.isdir(path) and holds_projections(path):
        return str(checkpoint_dir(path))
    return None


def check_infer_args(margs: MatryoshkaArguments, model_args: Any) -> list[str]:
    """Refuse, before anything loads, what the inference keys cannot do; returns lines to log.

    `model_args.model_name_or_path` is replaced by a checkpoint directory when it names the embedded
    model, shipped projections or a projections artifact.
    """
    from plugin.families import PCA_TYPES

    notes = []
    backend = str(getattr(model_args, "infer_backend", HF_BACKEND) or HF_BACKEND)
    path = getattr(model_args, "model_name_or_path", None)
    if backend != HF_BACKEND:
        config = _config(path) or {}
        names = path in _shipped_names() or config.get("model_type") in PCA_TYPES
        if margs.serving or names:
            asked = ", ".join(f"`{name}`" for name in SERVING_FIELDS if _is_set(margs, name))
            what = f"{asked} need" if asked else "a PcaLlama checkpoint needs"
            raise ValueError(f"`infer_backend: {backend}`: {what} `infer_backend: huggingface` (the default), because "
                             f"{BACKEND_REASON}.")
        return notes
    resolved = resolve_model_path(path)
    if resolved is not None:
        notes.append(f"Matryoshka: model_name_or_path {path!r} -> checkpoint {resolved}")
        model_args.model_name_or_path = path = resolved
    if not margs.serving:
        return notes
    if getattr(model_args, "export_dir", None):
        notes.append("Matryoshka: `export` saves the checkpoint's own ranks; the inference keys (" +
                     ", ".join(f"`{name}`" for name in SERVING_FIELDS if _is_set(margs, name)) +
                     ") apply to chat, api and webchat only.")
        return notes
    config = _config(path)
    if config is None:
        return notes  # a hub id: the loaded model is checked in apply_settings
    if config.get("model_type") not in PCA_TYPES:
        raise ValueError(
            f"{', '.join(f'`{name}`' for name in SERVING_FIELDS if _is_set(margs, name))} need a PcaLlama checkpoint "
            f"(model_type {', '.join(PCA_TYPES)}), but {path} has model_type {config.get('model_type')!r}: point "
            "model_name_or_path at one (`mkv calibrate` writes one; `embedded-matryoshka` names the shipped "
            "projections), or drop these keys."
        )
    check_rank_file(margs, config)
    return notes


def _shipped_names() -> tuple[str, ...]:
    from plugin.storage.loading import EMBEDDED, SHIPPED

    return (EMBEDDED, *SHIPPED)


def _is_set(margs: MatryoshkaArguments, name: str) -> bool:
    value = getattr(margs, name)
    return bool(value) if name == "matryoshka_eviction_ratio" else value is not None


def check_rank_file(margs: MatryoshkaArguments, config: dict[str, Any]) -> None:
    """The rank file against the model's shape, and its bit widths against ``matryoshka_kv_bits``."""
    if margs.matryoshka_rank_file is None:
        return
    from plugin.budgets.ranks import read_rank_file
    from plugin.cache import QuantSpec
    from plugin.storage.loading import kv_shape

    path = margs.matryoshka_rank_file
    layers, heads, head_dim = kv_shape(config)
    read_rank_file(path, layers, heads, head_dim)
    spec = QuantSpec.from_rank_file(json.loads(Path(path).read_text()), layers, heads, path)
    if spec is not None and margs.matryoshka_kv_bits is not None:
        raise ValueError(f"rank file {path!r} carries its own bit widths (`mkv search-budget --bytes`); drop "
                         "`matryoshka_kv_bits`, or use a rank file without bits.")


def apply_settings(model: Any, margs: MatryoshkaArguments) -> str | None:
    """Set ranks, bits and eviction on the PcaLlama in `model` (also under PEFT); returns the line to log.

    A model that is not a PcaLlama is refused when an inference key is set (a hub id is only known here).
    The projected attention builds its inference weights once, here, so the first request does not.
    """
    from .projection_params import find_pca_model, model_type_of

    pca = find_pca_model(model)
    if pca is None:
        if margs.serving:
            raise ValueError(f"the inference keys need a PcaLlama model; {getattr(model, 'name_or_path', 'the model')} "
                             f"loaded as model_type {model_type_of(model)!r}.")
        return None
    if margs.matryoshka_kv_budget is not None:
        pca.set_kv_budget(margs.matryoshka_kv_budget)
    elif margs.matryoshka_rank_file is not None:
        pca.load_rank_file(margs.matryoshka_rank_file)
    bits = margs.kv_bits()
    if bits is not None:
        pca.set_kv_bits(*bits)
    if margs.matryoshka_eviction_ratio > 0.0:
        from plugin.cache.eviction import SnapEviction

        pca.set_kv_eviction(SnapEviction(margs.matryoshka_eviction_ratio))  # held for the model's life
    warm_up(pca)
    return describe(pca, margs)


def warm_up(pca: Any) -> None:
    """One two-token forward through a cache: builds the folded inference weights and proves the settings run."""
    import torch

    device = next(pca.parameters()).device
    with torch.no_grad():
        pca(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=True)


def describe(pca: Any, margs: MatryoshkaArguments) -> str:
    bits = pca.get_kv_bits()
    ranks = pca.get_kv_ranks()
    head_dim = pca.config.head_dim
    uniform = {r for kind in ("key", "value") for row in ranks[kind] for r in row}
    rank_text = f"ranks {uniform.pop()}/{head_dim}" if len(uniform) == 1 else f"per-head ranks ({margs.matryoshka_rank_file})"
    if bits is None or bits.is_identity():
        bit_text = "16-bit"
    else:
        pairs = {(k, v) for krow, vrow in zip(bits.key_bits, bits.value_bits) for k, v in zip(krow, vrow)}
        bit_text = f"{'/'.join(map(str, pairs.pop()))} bits" if len(pairs) == 1 else "per-head bits"
    per_token = pca.kv_cache_bytes_per_token()
    full = pca.full_cache_bytes_per_token()
    eviction = (f"{margs.matryoshka_eviction_ratio:g} of each prompt evicted at prefill"
                if margs.matryoshka_eviction_ratio > 0 else "no eviction")
    return (f"Matryoshka inference: KV budget {pca.kv_budget():.4g} ({rank_text}, {bit_text}), {eviction}; "
            f"cache {per_token:.6g} bytes/token vs {full} full ({per_token / full:.3f}).")
