"""Text sources and fixed token windows for calibration, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

EMBEDDED_PREFIX = "sotu:"
FICTION_SOURCE = "fiction:"


def load_texts(source: str | None = None, split: str = "evaluation") -> list[str]:
    """Texts from a source.

    - None or ``sotu:<split>``: the embedded State of the Union corpus (``split`` is the default split);
    - ``fiction:``: a second kind of English, Doyle's *Adventures of Sherlock Holmes* (never trained on);
    - a ``.txt`` file: its text; a ``.jsonl``/``.json`` file: the ``"text"`` field of each record;
    - a directory: a saved ``datasets`` dataset (column ``text``), else every ``*.txt`` inside.
    """
    if source == FICTION_SOURCE:
        from .assets import fiction_texts

        texts = fiction_texts()
    elif source is None or source.startswith(EMBEDDED_PREFIX):
        from .corpus import corpus_texts

        name = split if source is None or source == EMBEDDED_PREFIX else source[len(EMBEDDED_PREFIX):]
        texts = corpus_texts(name)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"data {source!r} does not exist; give a .txt/.jsonl file, a saved datasets directory, "
                "sotu:calibration|training|evaluation for the embedded corpus, or fiction: for the embedded fiction"
            )
        texts = _read_path(path)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"data {source or 'sotu:' + split!r} holds no text; give a source with non-empty text")
    return texts


def _read_path(path: Path) -> list[str]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            data: Any = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                data = data[next(iter(data))]
            if "text" not in data.column_names:
                raise ValueError(f"dataset {str(path)!r} has no 'text' column (columns: {data.column_names})")
            return list(data["text"])
        return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.glob("*.txt"))]
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        try:
            return [str(r["text"]) for r in records]
        except (KeyError, TypeError):
            raise ValueError(f"{str(path)!r}: every record needs a 'text' field") from None
    return [path.read_text(encoding="utf-8", errors="replace")]


def token_windows(
    tokenizer: Any, texts: list[str], seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` cut from the texts joined by EOS (at most max_tokens in all)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(separator)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(
            f"the data gives {len(ids)} tokens, fewer than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
