"""Write checkpoints and artifacts atomically, and refuse an output that writing would destroy.

A write goes into a temporary sibling directory that is renamed into place: a failure leaves no new
directory and the one being replaced intact.
"""

from __future__ import annotations

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


def is_checkpoint(path: Path) -> bool:
    """A Hugging Face checkpoint directory (it has a config.json)."""
    return (path / "config.json").is_file()


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
