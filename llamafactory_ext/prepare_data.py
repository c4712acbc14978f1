"""Write the LLaMA-Factory datasets used by ``scripts/matryoshka_*.yaml`` into ``data/``.

    python -m llamafactory_ext.prepare_data            # data/sotu_train.jsonl (idempotent)
    python -m llamafactory_ext.prepare_data --chat     # also data/self_chat_train.jsonl (~6 min on 2 cores)
    python -m llamafactory_ext.prepare_data --force    # rewrite them

``data/sotu_train.jsonl`` is the *training* split of the embedded State of the Union corpus
(speeches 1900-1999; calibration uses 1790-1899 and evaluation 2000-, so the three never
overlap), one ``{"text": ...}`` line per group of paragraphs (<= 2000 characters).  It is about
5.6 MB and is generated, not committed.

``data/self_chat_train.jsonl`` holds the embedded instruct model's own answers to the
``training`` instructions of :mod:`plugin.evaluation.instructions` (one greedy and ``--samples`` sampled
answers each), each conversation written out in the model's chat template as one ``{"text"}``
line: the text the model is served, and in-distribution for self-distillation from that same
model.  The ``heldout`` instructions are never written (they are the generation check's).
``data/matryoshka_sft_demo.jsonl`` (the tiny instruction set of ``scripts/matryoshka_sft.yaml``)
is committed as is.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _fresh(path: Path, force: bool) -> bool:
    if path.is_file() and path.stat().st_size > 0 and not force:
        print(f"{path} exists (use --force to rewrite)")
        return False
    return True


def write_self_chat(target: Path, samples: int = 0, max_new_tokens: int = 96, batch_size: int = 24) -> int:
    """Generate the self-chat dataset into ``target`` (written to a temp file, then renamed)."""
    from plugin.evaluation.chat import chat_text, generate_answers
    from plugin.evaluation.instructions import instructions
    from plugin.storage.assets import load_embedded_model

    model, tokenizer = load_embedded_model()
    prompts = instructions("training")
    rows: list[str] = []
    for index in range(samples + 1):
        answers = generate_answers(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            do_sample=index > 0, seed=index, desc=f"self-chat {index + 1}/{samples + 1}",
        )
        rows.extend(json.dumps({"text": chat_text(tokenizer, p, a)}) for p, a in zip(prompts, answers) if a)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m llamafactory_ext.prepare_data\n"
               "  python -m llamafactory_ext.prepare_data --chat --samples 1",
    )
    parser.add_argument("--data-dir", default="data", help="dataset_dir of the YAMLs (default: data)")
    parser.add_argument("--force", action="store_true", help="rewrite existing files")
    parser.add_argument("--chat", action="store_true",
                        help="also write self_chat_train.jsonl (the model's own chat answers; needs the model)")
    parser.add_argument("--samples", type=int, default=0,
                        help="sampled answers per instruction besides the greedy one (default 0)")
    args = parser.parse_args(argv)
    if args.samples < 0:
        parser.error("--samples must be >= 0")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        parser.error(f"--data-dir {str(data_dir)!r} is not a directory; create it or point at the YAMLs' dataset_dir")
    target = data_dir / "sotu_train.jsonl"
    if _fresh(target, args.force):
        from plugin.storage.corpus import write_corpus_jsonl

        count = write_corpus_jsonl("training", target)
        print(f"wrote {count} lines to {target}")
    chat = data_dir / "self_chat_train.jsonl"
    if args.chat and _fresh(chat, args.force):
        count = write_self_chat(chat, samples=args.samples)
        print(f"wrote {count} conversations to {chat}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
