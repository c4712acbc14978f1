"""The README and docs/ hold what they say: figures read from the JSON that produced them, links that resolve,
every page indexed, and the README's Python example and quick `mkv` commands running as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.headline import BLOCKS, RENDER, block_pattern

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_headline_tables_are_what_the_json_gives() -> None:
    for path, key in BLOCKS.items():
        block = block_pattern(key).search(path.read_text())
        assert block is not None, f"{path} lost its {key} block"
        body = path.read_text()[block.end(1): block.start(2)]
        assert body == RENDER[key](), f"{path.name} is out of date with its JSON: run python -m benchmarks.headline"


def _links(path: Path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()) if "://" not in m]


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    missing = [link for link in _links(page) if not (page.parent / link).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_every_docs_page_is_indexed_and_the_readme_is_short() -> None:
    indexed = set(_links(ROOT / "docs" / "README.md"))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= indexed, f"docs/README.md does not list {sorted(pages - indexed)}"
    assert len(README.read_text().splitlines()) <= 160


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    (code,) = _readme_blocks("python")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "of 46080 bytes per token" in proc.stdout  # half of SmolLM2-135M's 46,080-byte full cache: 23040


@pytest.mark.slow
def test_readme_quick_mkv_commands_run_as_written(tmp_path: Path) -> None:
    commands = [line.split("#")[0].strip() for block in _readme_blocks("bash") for line in block.splitlines()
                if line.startswith("mkv ")]
    assert len(commands) >= 3
    mkv = str(Path(sys.executable).parent / "mkv")
    for command in commands:
        proc = subprocess.run([mkv, *command.split()[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
