"""Load models by name or path (embedded, shipped projections, checkpoints, projections artifacts)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import is_checkpoint, save_checkpoint

EMBEDDED = "embedded"
# Projections shipped with the package, by the names `mkv eval --model` takes: the 512-token recipe
# (post-RoPE keys) and the long-context recipe (pre-RoPE keys, 2,048-token windows; docs/longctx.md).
SHIPPED = {name: Path(__file__).resolve().parents[1] / "trained" / name  # plugin/trained
           for name in ("embedded-matryoshka", "embedded-matryoshka-longctx")}


def resolve_spec(spec: str | None) -> str | None:
    """A shipped artifact's name -> its directory; anything else unchanged."""
    if spec in SHIPPED:
        if not (SHIPPED[spec] / "projections.safetensors").is_file():
            raise FileNotFoundError(f"the shipped projections {spec!r} are missing from {SHIPPED[spec]}; reinstall")
        return str(SHIPPED[spec])
    return spec


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None,
               base_model: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for ``embedded`` (SmolLM2-135M), a local HF directory (Llama or PcaLlama), or a
    projections artifact (`mkv export-projections`), loaded onto `base_model` or the base it records."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .artifact_format import is_projections_dir, read_projections_config
    from .artifacts import load_projections

    spec = resolve_spec(spec)
    if spec not in (None, EMBEDDED) and holds_projections(spec):
        base_spec = base_model or read_projections_config(spec).get("base_model")
        if not base_spec:
            raise ValueError(f"projections {spec!r} record no base model; give the base Llama with --base-model")
        if base_spec not in (None, EMBEDDED) and is_projections_dir(base_spec):
            raise ValueError(f"the base of projections {spec!r} is itself a projections artifact; give a model")
        base, tokenizer = load_model(base_spec, dtype)
        model = load_projections(base, spec)
    elif spec in (None, EMBEDDED):
        from .assets import load_embedded_model

        model, tokenizer = load_embedded_model(dtype=dtype)
    else:
        path = Path(spec)
        model_config(spec)  # a clear error for a missing directory or a foreign model type
        AutoConfig.from_pretrained(path)  # fail early with transformers' own message on a broken config
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer


def holds_projections(spec: str | os.PathLike) -> bool:
    """A projections artifact, or a directory meant as one: its projections_config.json is read (and a broken one
    reported as such) rather than the directory being taken for a model without config.json."""
    from .artifact_format import CONFIG_FILE, is_projections_dir

    path = Path(spec)
    return is_projections_dir(path) or ((path / CONFIG_FILE).is_file() and not is_checkpoint(path))


def checkpoint_dir(spec: str) -> Path:
    """A local checkpoint directory that any Hugging Face loader reads, for a name `load_model` understands.

    ``embedded`` is the embedded SmolLM2-135M's own cache directory; a shipped projections name
    (``embedded-matryoshka``) or a projections artifact becomes a PcaLlama checkpoint of the projections
    on their base (with its tokenizer), written once into the cache (``$MKV_CACHE_DIR/checkpoints``) under a
    name that carries a fingerprint of the projections, so changed projections get a new directory. A
    checkpoint directory is returned as it is.
    """
    from .artifact_format import read_projections_config
    from .assets import _build_lock, cache_root, embedded_model_dir

    if spec in (None, EMBEDDED):
        return embedded_model_dir()
    path = Path(resolve_spec(spec))
    if is_checkpoint(path):
        return path
    if not holds_projections(path):
        model_config(spec)  # the clear error for a path that is neither
        return path
    read_projections_config(path)  # a broken artifact is reported before the lock is taken
    root = cache_root() / "checkpoints"
    out = root / f"{spec if spec in SHIPPED else path.name}-{projections_digest(path)}"
    with _build_lock(root):  # servers started together build it once
        if not is_checkpoint(out):
            model, tokenizer = load_model(spec)
            save_checkpoint(model, tokenizer, out, extra={"mkv_source.json": {"projections": str(path)}},
                            overwrite=True)
    return out


def projections_digest(path: str | Path) -> str:
    """The first 12 hex digits of the sha256 of a projections artifact's config and weights: which projections
    a derived checkpoint or a measurement came from."""
    from .artifact_format import CONFIG_FILE, WEIGHTS_FILE

    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        file = Path(path) / name
        digest.update(file.read_bytes() if file.is_file() else b"")
    return digest.hexdigest()[:12]


def model_config(spec: str | None) -> dict[str, Any]:
    """The config.json of ``embedded`` or a local model directory, checked to be a Llama-family model.

    Cheap (no weights are read), so commands can validate their other inputs against the model's
    shape before any long work.
    """
    from .artifact_format import read_projections_config

    spec = resolve_spec(spec)
    if spec in (None, EMBEDDED):
        from .assets import embedded_model_dir

        path = embedded_model_dir()
    elif holds_projections(spec):
        return {**read_projections_config(spec), "model_type": "pcallama"}  # it loads as a PcaLlama
    else:
        path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {spec!r} is not a local Hugging Face model directory (no config.json); "
            "give a directory written by save_pretrained / `mkv calibrate`, or 'embedded'"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path / 'config.json')!r} is not valid JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    from ..families import PCA_TYPES, SOURCE_TYPES, SUPPORTED

    if model_type not in (*SOURCE_TYPES, *PCA_TYPES):
        raise ValueError(
            f"model {spec!r} has model_type {model_type!r}; matryoshka-kv works on decoders with Llama-shaped "
            f"attention ({SUPPORTED}) and their converted checkpoints ({', '.join(PCA_TYPES)})"
        )
    return config


def kv_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) from a config.json dict."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"], config.get("num_key_value_heads") or config["num_attention_heads"], head_dim
