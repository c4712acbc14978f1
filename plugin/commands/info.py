"""Show versions of Python and the frameworks, the compute device and the embedded assets.

Nothing is built or downloaded: the embedded model cache is only inspected.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

EXAMPLES = """\
examples:
  mkv info            human-readable summary
  mkv info --json     the same as JSON (for scripts and bug reports)
"""

#: (label, distribution name) reported by `mkv info`.
PACKAGES = [
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("llamafactory", "llamafactory"),
    ("opencompass", "opencompass"),
    ("deepspeed", "deepspeed"),
    ("matryoshka-kv", "matryoshka-kv"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device() -> dict[str, object]:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a hard dependency
        return {"device": "unknown", "error": str(exc)}
    info: dict[str, object] = {"device": "cpu", "cuda_build": torch.version.cuda,
                               "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def assets_state(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Paths, cache state and package versions of the embedded assets (builds nothing)."""
    from plugin.storage.assets import (
        CORPUS_DISTRIBUTION,
        GGUF_DISTRIBUTION,
        MODEL_SUBDIR,
        AssetError,
        cache_problem,
        cache_root,
        corpus_dir,
        gguf_path,
    )
    from plugin.storage.corpus import CORPUS_SPLITS, speeches
    root = cache_root(cache_dir)
    model_dir = root / MODEL_SUBDIR
    state: dict[str, Any] = {
        "cache_dir": str(root),
        "model_dir": str(model_dir),
        "packages": {
            GGUF_DISTRIBUTION: _version(GGUF_DISTRIBUTION),
            CORPUS_DISTRIBUTION: _version(CORPUS_DISTRIBUTION),
        },
    }
    try:
        state["gguf_file"] = str(gguf_path())
    except AssetError as exc:
        state["gguf_file"] = None
        state["gguf_error"] = str(exc)
    try:
        problem = cache_problem(model_dir)
    except OSError as exc:
        problem = str(exc)
    state["model_cached"] = problem is None
    if problem is not None:
        state["model_cache_problem"] = problem
    try:
        state["corpus_dir"] = str(corpus_dir())
        speeches = speeches()
        state["corpus_speeches"] = len(speeches)
        state["corpus_splits"] = {
            name: {
                "years": f"{first}-{min(last, max(y for y, *_ in speeches))}",
                "speeches": sum(first <= y <= last for y, *_ in speeches),
            }
            for name, (first, last) in CORPUS_SPLITS.items()
        }
    except AssetError as exc:
        state["corpus_dir"] = None
        state["corpus_error"] = str(exc)
    return state


def collect() -> dict[str, Any]:
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "packages": {label: _version(dist) for label, dist in PACKAGES},
        **_device(),
        "assets": assets_state(),
    }


def run(args: argparse.Namespace) -> int:
    state: dict[str, Any] = collect()
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"python        {state['python']}")
    for label, version in state["packages"].items():
        print(f"{label:<13} {version or 'not installed'}")
    if state["device"] == "cuda":
        device = f"cuda ({', '.join(state['gpus'])})"
    else:
        device = (f"cpu ({state.get('threads')} threads, torch CUDA build: "
                  f"{state.get('cuda_build') or 'none'})")
    print(f"device        {device}")
    a: dict[str, Any] = state["assets"]
    print("assets")
    for dist, version in a["packages"].items():
        print(f"  {dist:<11} {version or 'not installed'}")
    print(f"  gguf        {a.get('gguf_file') or a.get('gguf_error')}")
    cached = "built" if a["model_cached"] else f"not built ({a.get('model_cache_problem')})"
    print(f"  model cache {a['model_dir']}: {cached}")
    if a.get("corpus_dir"):
        print(f"  corpus      {a['corpus_dir']} ({a['corpus_speeches']} speeches)")
        for name, split in a["corpus_splits"].items():
            print(f"    {name:<12} {split['years']:<10} {split['speeches']} speeches")
    else:
        print(f"  corpus      {a.get('corpus_error')}")
    return 0
