"""Load models by name or path, and write checkpoints atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

EMBEDDED = "embedded"


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for ``embedded`` (SmolLM2-135M) or a local HF directory (Llama or PcaLlama)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .registration import register

    register()
    if spec in (None, EMBEDDED):
        from .assets import load_embedded_model

        model, tokenizer = load_embedded_model(dtype=dtype)
    else:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {spec!r} is not a local Hugging Face model directory (no config.json); "
                "give a directory written by save_pretrained / `mkv calibrate`, or 'embedded'"
            )
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type not in ("llama", "mistral", "pcallama"):
            raise ValueError(
                f"model {spec!r} has model_type {model_type!r}; matryoshka-kv works on Llama-family "
                "models (llama, mistral without sliding window, pcallama)"
            )
        AutoConfig.from_pretrained(path)  # fail early with transformers' own message on a broken config
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out_dir`, on failure it is removed."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_checkpoint(model: Any, tokenizer: Any, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """save_pretrained model + tokenizer (+ JSON side files) into `out_dir`, atomically."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra or {}).items():
            if isinstance(payload, torch.Tensor) or (isinstance(payload, dict) and any(isinstance(v, torch.Tensor) for v in payload.values())):
                torch.save(payload, tmp / name)
            else:
                (tmp / name).write_text(json.dumps(payload, indent=1))
    return Path(out_dir)
