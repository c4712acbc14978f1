"""Show versions of Python and the frameworks, the compute device and the embedded assets.

Nothing is built or downloaded: the embedded model cache is only inspected.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
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


def collect() -> dict[str, Any]:
    from plugin.storage import assets

    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "packages": {label: _version(dist) for label, dist in PACKAGES},
        **_device(),
        "assets": assets.assets_state(),
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
