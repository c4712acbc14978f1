"""The projections artifact format: MatryoshkaKV's K/V projections saved apart from the base weights.

Reading and checking need no model class, so plugin.model.modeling reads artifacts from here
(`from_llama(projections=...)`) while plugin.storage.artifacts, which saves and loads models, imports modeling.

An artifact is a directory holding exactly two files:

* ``projections_config.json`` (keys sorted): ``"format": "matryoshka-kv-projections"``,
  ``"format_version": 1``, ``base_model`` (name or path, informational, may be null),
  ``model_family`` ("llama": the Llama-shaped attention every supported family shares, see
  plugin.families), ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``,
  ``hidden_size``, ``vocab_size``, ``kv_ranks`` (``{"key", "value"}``, ``[L][n_kv]``),
  ``kv_rank_step``, ``kv_key_space`` ("post-rope" or "pre-rope": where the key basis sits relative to
  RoPE; absent in older artifacts, which are "post-rope"), ``kv_budget`` (mean r / head_dim of
  ``kv_ranks``), ``dtype`` ("float32").
* ``projections.safetensors``: per layer l, ``layers.{l}.key_basis`` and ``layers.{l}.value_basis``
  ``[n_kv, d, d]`` (the effective bases U = base @ cayley(skew), so no Cayley generators are needed)
  and ``layers.{l}.value_mean`` ``[n_kv, d]``, all float32 and nothing else: 4 L n_kv (2 d^2 + d)
  bytes of data plus the safetensors header.

Invariants: loading an artifact onto the base it was made from reproduces the saved model's
projections bit for bit (U_K, U_V, mu_V and the ranks), hence its logits at every rank table.
Every check of the artifact and of the base runs before any model is built or changed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..budgets.ranks import RankTable, check_step, validate_ranks
from ..families import PCA_TYPES, SOURCE_TYPES
from ..model.config import check_key_space
from .atomic import check_output_dir

FORMAT = "matryoshka-kv-projections"
FORMAT_VERSION = 1
CONFIG_FILE = "projections_config.json"
WEIGHTS_FILE = "projections.safetensors"
FAMILY = "llama"
TENSOR_NAMES = ("key_basis", "value_basis", "value_mean")
#: Base model types the projections can be loaded onto (PcaLlama's own, and those from_llama converts).
BASE_TYPES = (*SOURCE_TYPES, *PCA_TYPES)
SHAPE_FIELDS = ("num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size")
# Loaded bases must be orthogonal; float32 Cayley bases are within ~1e-5, corrupted data far outside.
ORTHOGONALITY_TOLERANCE = 1e-3
WHAT = "projections artifact"


def is_projections_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory whose config names the projections format."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def check_target(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a target that saving would destroy (see `plugin.storage.atomic.check_output_dir`)."""
    return check_output_dir(out_dir, overwrite, is_projections_dir, WHAT)


def projections_size(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of tensor data in projections.safetensors (the header comes on top)."""
    return 4 * num_layers * num_kv_heads * (2 * head_dim * head_dim + head_dim)


# -- load -------------------------------------------------------------------------------------------
def read_projections_config(path: str | os.PathLike) -> dict[str, Any]:
    """The validated projections_config.json of an artifact directory (ValueError on any defect)."""
    directory = Path(path)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        what = "does not exist" if not directory.exists() else f"has no {CONFIG_FILE}"
        raise ValueError(
            f"projections {str(directory)!r} {what}; give a directory written by save_projections "
            "or `mkv export-projections`"
        )
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({err}); re-export the projections") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(
            f"{str(config_file)!r} has format {got!r}, not {FORMAT!r}; it is not a MatryoshkaKV projections "
            "artifact (a PcaLlama checkpoint directory loads with from_pretrained)"
        )
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade matryoshka-kv" if isinstance(version, int) and version > FORMAT_VERSION else "re-export it"
        raise ValueError(
            f"{str(config_file)!r} has format_version {version!r}; this matryoshka-kv reads version "
            f"{FORMAT_VERSION}: {hint}"
        )
    for field in (*SHAPE_FIELDS, "kv_rank_step"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{str(config_file)!r}: {field} must be a positive integer, got {value!r}; re-export it")
    if config.get("model_family") != FAMILY:
        raise ValueError(
            f"{str(config_file)!r} is for model family {config.get('model_family')!r}; "
            f"this matryoshka-kv loads {FAMILY!r} projections"
        )
    try:
        config["kv_key_space"] = check_key_space(config.get("kv_key_space", "post-rope"))  # older artifacts: post
        check_step(config["head_dim"], config["kv_rank_step"])
        config["kv_ranks"] = validate_ranks(
            config.get("kv_ranks"), config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
        )
    except ValueError as err:
        raise ValueError(f"{str(config_file)!r}: {err}") from None
    return config


def check_base(base: Any, config: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise one ValueError naming the first mismatch between `base` and the artifact's shapes."""
    base_config = getattr(base, "config", None)
    model_type = getattr(base_config, "model_type", None)
    if model_type not in BASE_TYPES or not hasattr(base, "lm_head"):
        raise ValueError(
            f"projections load onto a Llama-family causal LM (model_type {', '.join(BASE_TYPES)}); got "
            f"{type(base).__name__} with model_type {model_type!r}: load the base model the projections were made "
            f"from ({config.get('base_model')!r})"
        )
    head_dim = getattr(base_config, "head_dim", None) or base_config.hidden_size // base_config.num_attention_heads
    actual = {
        "num_hidden_layers": base_config.num_hidden_layers,
        "num_key_value_heads": getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads,
        "head_dim": head_dim,
        "hidden_size": base_config.hidden_size,
    }
    for field in SHAPE_FIELDS:
        if actual[field] != config[field]:
            raise ValueError(
                f"projections {str(path)!r} were made for {field}={config[field]}, but the base model has "
                f"{field}={actual[field]}; load them onto the base they were made from ({config.get('base_model')!r})"
            )
    vocab = getattr(base_config, "vocab_size", None)
    if config.get("vocab_size") is not None and vocab != config["vocab_size"]:
        # Projections do not touch the embeddings; a resized vocabulary may still be the right base.
        warnings.warn(
            f"projections {str(path)!r} were made on a base with vocab_size={config['vocab_size']}, this base has "
            f"{vocab}; check that it is the base they were made from ({config.get('base_model')!r})",
            stacklevel=3,
        )


def read_projection_tensors(path: str | os.PathLike, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Stacked ``key_bases``, ``value_bases`` ``[L, n_kv, d, d]`` and ``value_means`` ``[L, n_kv, d]``, checked."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"projections {str(path)!r} have no {WEIGHTS_FILE}; re-export them")
    layers, n_kv, d = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    shapes = {"key_basis": (n_kv, d, d), "value_basis": (n_kv, d, d), "value_mean": (n_kv, d)}
    expected = {f"layers.{index}.{name}" for index in range(layers) for name in TENSOR_NAMES}
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = set(handle.keys())
            if names != expected:
                missing, extra = sorted(expected - names), sorted(names - expected)
                raise ValueError(
                    f"{str(weights)!r} does not match its config ({layers} layers): missing {missing[:3]}, "
                    f"unexpected {extra[:3]}; re-export the projections"
                )
            loaded = {name: handle.get_tensor(name) for name in sorted(names)}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file ({err}); re-export the projections") from None
    for name, tensor in loaded.items():
        want = shapes[name.rsplit(".", 1)[1]]
        if tensor.dtype != torch.float32 or tuple(tensor.shape) != want:
            raise ValueError(
                f"{str(weights)!r}: {name} is {tensor.dtype} {tuple(tensor.shape)}, expected torch.float32 {want}; "
                "re-export the projections"
            )
    stacked = {
        plural: torch.stack([loaded[f"layers.{index}.{name}"] for index in range(layers)])
        for plural, name in (("key_bases", "key_basis"), ("value_bases", "value_basis"), ("value_means", "value_mean"))
    }
    eye = torch.eye(d)
    for kind in ("key_bases", "value_bases"):
        basis = stacked[kind]
        error = float((basis.double().transpose(-1, -2) @ basis.double() - eye.double()).abs().max())
        if not error <= ORTHOGONALITY_TOLERANCE:  # also catches NaN
            raise ValueError(
                f"{str(weights)!r}: {kind} are not orthogonal (max |U^T U - I| = {error:.3g}); the file is corrupt, "
                "re-export the projections"
            )
    return stacked


def read_projections(path: str | os.PathLike, base: Any, ranks: Any = None) -> tuple[dict[str, Any], RankTable, dict[str, torch.Tensor]]:
    """(config, rank table, tensors) of artifact `path`, every check against `base` done; no model is changed.

    `ranks` ({"key", "value"} tables) overrides the artifact's rank table.
    """
    config = read_projections_config(path)
    check_base(base, config, path)
    table = config["kv_ranks"] if ranks is None else validate_ranks(
        ranks, config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    )
    return config, table, read_projection_tensors(path, config)
