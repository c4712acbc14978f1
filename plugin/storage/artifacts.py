"""Save a PcaLlama's projections as an artifact, and load an artifact onto a base model.

The artifact's format, and every check made before a model is built or changed, is plugin.storage.artifact_format.
Saving writes into a temporary sibling directory renamed into place: a failure leaves no new directory
and an artifact being replaced intact. Saving never replaces anything but an empty directory or, with
overwrite, another projections artifact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..budgets.ranks import table_budget
from ..model.modeling import PcaLlamaForCausalLM
from .artifact_format import (
    CONFIG_FILE,
    FAMILY,
    FORMAT,
    FORMAT_VERSION,
    TENSOR_NAMES,
    WEIGHTS_FILE,
    WHAT,
    check_target,
    is_projections_dir,
    projections_size,
    read_projections,
    read_projections_config,
)
from .atomic import atomic_directory

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "check_target",
    "is_projections_dir",
    "load_projections",
    "projections_size",
    "read_projections_config",
    "save_projections",
]


# -- save -------------------------------------------------------------------------------------------
@torch.no_grad()
def save_projections(
    model: Any, out_dir: str | os.PathLike, base_model: str | None = None, overwrite: bool = False
) -> Path:
    """Write the projections of a PcaLlamaForCausalLM (bases, value means, ranks) as an artifact.

    base_model: name or path of the base the projections belong to (default: the model config's
    ``_name_or_path``, or null). A missing `out_dir` or an empty directory is written; an existing
    artifact is replaced only with `overwrite`; anything else is refused before writing.
    """
    if not isinstance(model, PcaLlamaForCausalLM):
        raise ValueError(  # noqa: TRY004 - bad input, reported by the CLI as one line
            f"save_projections needs a PcaLlamaForCausalLM, got {type(model).__name__}; "
            "convert a Llama with PcaLlamaForCausalLM.from_llama or calibrate it first (`mkv calibrate`)"
        )
    check_target(out_dir, overwrite)  # before copying tensors
    cfg = model.config
    tensors: dict[str, torch.Tensor] = {}
    for index, attn in enumerate(model.attention_layers()):
        for name, tensor in zip(TENSOR_NAMES, attn.kv_proj.bases()):
            # own CPU float32 copies: a basis may be the stored buffer itself, and safetensors refuses shared storage
            tensors[f"layers.{index}.{name}"] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    ranks = model.get_kv_ranks()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model if base_model is not None else (getattr(cfg, "_name_or_path", None) or None),
        "model_family": FAMILY,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "kv_ranks": ranks,
        "kv_rank_step": cfg.kv_rank_step,
        "kv_key_space": cfg.kv_key_space,
        "kv_budget": round(table_budget(ranks, cfg.head_dim), 6),
        "dtype": "float32",
    }
    with atomic_directory(out_dir, overwrite, is_projections_dir, WHAT) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def load_projections(model: Any, path: str | os.PathLike, ranks: Any = None) -> Any:
    """A PcaLlamaForCausalLM: `model` (a Llama or PcaLlama) with the projections of artifact `path`.

    A base model (Llama, Mistral, Qwen2, Qwen3) is wrapped by PcaLlamaForCausalLM.from_llama: the
    result shares its weights and the Llama itself is left unchanged. A PcaLlama gets the bases,
    means, ranks and rank step installed in place (its trained Cayley generators reset to zero) and
    is returned. `ranks` ({"key", "value"} tables) overrides the artifact's rank table. Every check
    runs first; on a ValueError no model has been built or changed.
    """
    config, table, tensors = read_projections(path, model, ranks)
    if isinstance(model, PcaLlamaForCausalLM):
        pca = model
        pca.set_bases(tensors["key_bases"], tensors["value_bases"], tensors["value_means"])
        pca.config.kv_key_space = config["kv_key_space"]
        for attn in pca.attention_layers():
            attn.invalidate()
    else:
        pca = PcaLlamaForCausalLM.from_llama(
            model, tensors["key_bases"], tensors["value_bases"], tensors["value_means"], ranks=table,
            key_space=config["kv_key_space"],
        )
    pca.config.kv_rank_step = config["kv_rank_step"]
    pca.set_kv_ranks(table)
    return pca
