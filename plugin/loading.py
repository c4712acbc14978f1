"""Load models by name or path, and write checkpoints atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

EMBEDDED = "embedded"
# Projections artifacts shipped in the package, by name: the recipe's result for the embedded model.
SHIPPED = {"embedded-matryoshka": Path(__file__).resolve().parent / "trained" / "embedded-matryoshka"}


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

    from .projection_files import is_projections_dir, load_projections, read_projections_config
    from .registration import register

    register()
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


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def holds_projections(spec: str | os.PathLike) -> bool:
    """A projections artifact, or a directory meant as one: its projections_config.json is read (and a broken one
    reported as such) rather than the directory being taken for a model without config.json."""
    from .projection_files import CONFIG_FILE, is_projections_dir

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
    from .assets import _build_lock, cache_root, embedded_model_dir
    from .projection_files import CONFIG_FILE, WEIGHTS_FILE, read_projections_config

    if spec in (None, EMBEDDED):
        return embedded_model_dir()
    path = Path(resolve_spec(spec))
    if is_checkpoint(path):
        return path
    if not holds_projections(path):
        model_config(spec)  # the clear error for a path that is neither
        return path
    read_projections_config(path)  # a broken artifact is reported before the lock is taken
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        file = path / name
        digest.update(file.read_bytes() if file.is_file() else b"")
    root = cache_root() / "checkpoints"
    out = root / f"{spec if spec in SHIPPED else path.name}-{digest.hexdigest()[:12]}"
    with _build_lock(root):  # servers started together build it once
        if not is_checkpoint(out):
            model, tokenizer = load_model(spec)
            save_checkpoint(model, tokenizer, out, extra={"mkv_source.json": {"projections": str(path)}},
                            overwrite=True)
    return out


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                     is_kind: Callable[[Path], bool] = is_checkpoint, what: str = "checkpoint") -> Path:
    """Refuse an output path that writing would destroy; call it before long work, and again on write.

    A missing path or an empty directory is fine. An existing `what` (a directory `is_kind` accepts)
    is replaced only with `overwrite`. A file, or a non-empty directory that is not a `what`, is never
    replaced: it is somebody's data.
    """
    out = Path(out_dir)
    if out.is_symlink():
        raise FileExistsError(f"--out {str(out)!r} is a symbolic link; give the directory's real path")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is an existing file; give a directory path that does not exist yet")
    if out.is_dir() and any(out.iterdir()):
        if not is_kind(out):
            raise FileExistsError(f"--out {str(out)!r} is a non-empty directory that is not a {what}; "
                                  "choose another --out (it is left as it is)")
        if not overwrite:
            raise FileExistsError(f"--out {str(out)!r} already holds a {what}; pass --overwrite to replace it, "
                                  "or choose another --out")
    return out


def model_config(spec: str | None) -> dict[str, Any]:
    """The config.json of ``embedded`` or a local model directory, checked to be a Llama-family model.

    Cheap (no weights are read), so commands can validate their other inputs against the model's
    shape before any long work.
    """
    from .projection_files import read_projections_config

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
    from .families import PCA_TYPES, SOURCE_TYPES, SUPPORTED

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


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False,
                     is_kind: Callable[[Path], bool] = is_checkpoint, what: str = "checkpoint") -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out_dir`, on failure it is removed.

    `out_dir` is checked by :func:`check_output_dir` first; the replaced directory is renamed aside
    and deleted only once the new one is in place, so a crash never leaves `out_dir` missing both.
    """
    out = check_output_dir(out_dir, overwrite, is_kind, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        try:
            os.replace(out, old)  # an empty directory (mkdtemp's) may be replaced by a directory
        except OSError:
            old.rmdir()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def save_checkpoint(model: Any, tokenizer: Any, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """save_pretrained model + tokenizer (+ side files) into `out_dir`, atomically.

    `extra` maps file names to payloads: a dict of tensors is written as safetensors (the name must
    end in ``.safetensors``; checkpoints are shared, so nothing is pickled), anything else as JSON.
    """
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra or {}).items():
            if isinstance(payload, dict) and any(isinstance(v, torch.Tensor) for v in payload.values()):
                if not name.endswith(".safetensors"):
                    raise ValueError(f"tensor side file {name!r} must be a .safetensors file")
                save_file({key: value.contiguous() for key, value in payload.items()}, str(tmp / name))
            else:
                (tmp / name).write_text(json.dumps(payload, indent=1))
    return Path(out_dir)
