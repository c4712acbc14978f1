"""Shared pieces of the benchmark scripts: machine description and docs/benchmarks.md sections."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DATA = DOCS / "data"  # what the benchmarks write: JSON results and the PNG figures drawn from them
BENCH_MD = DOCS / "benchmarks.md"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only, {os.cpu_count()} cores"
    return f"{cpu}; {device}; torch {torch.__version__} ({torch.get_num_threads()} threads)"


def versions() -> str:
    names = ["torch", "transformers", "llamafactory", "opencompass", "deepspeed", "kvpress", "numpy"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def write_json(path: str | Path, result: dict) -> Path:
    """Write a benchmark's result (its parent folder created), and say where."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def header(command: str) -> str:
    today = datetime.date.today().isoformat()
    return f"Command: `{command}`  \nMachine: {machine()}  \nDate: {today}  \nVersions: {versions()}\n"


def write_section(key: str, title: str, body: str, first: bool = False) -> None:
    """Replace the section delimited by <!-- key:start --> / <!-- key:end --> in docs/benchmarks.md.

    A new section is appended, or with `first` placed before all others."""
    DOCS.mkdir(exist_ok=True)
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n\nEvery figure below is produced by a script in `benchmarks/` (`make bench` runs them all).\n"
    block = f"<!-- {key}:start -->\n## {title}\n\n{body.rstrip()}\n<!-- {key}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(key)}:start -->.*?<!-- {re.escape(key)}:end -->", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif first and "<!-- " in text:
        at = text.index("<!-- ")
        text = text[:at] + block + "\n\n" + text[at:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
