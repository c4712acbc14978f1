"""Write the LLaMA-Factory datasets used by ``scripts/matryoshka_*.yaml`` into ``data/``.

    python -m llamafactory_ext.prepare_data            # data/sotu_train.jsonl (idempotent)
    python -m llamafactory_ext.prepare_data --force    # rewrite it

``data/sotu_train.jsonl`` is the *training* split of the embedded State of the Union corpus
(speeches 1900-1999; calibration uses 1790-1899 and evaluation 2000-, so the three never
overlap), one ``{"text": ...}`` line per group of paragraphs (<= 2000 characters).  It is about
5.6 MB and is generated, not committed.  ``data/matryoshka_sft_demo.jsonl`` (the tiny instruction
set of ``scripts/matryoshka_sft.yaml``) is committed as is.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="dataset_dir of the YAMLs (default: data)")
    parser.add_argument("--force", action="store_true", help="rewrite existing files")
    args = parser.parse_args(argv)
    target = Path(args.data_dir) / "sotu_train.jsonl"
    if target.is_file() and target.stat().st_size > 0 and not args.force:
        print(f"{target} exists (use --force to rewrite)")
        return 0
    from plugin.assets import write_corpus_jsonl

    count = write_corpus_jsonl("training", target)
    print(f"wrote {count} lines to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
