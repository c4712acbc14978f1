"""LLaMA-Factory integration of MatryoshkaKV: Matryoshka trainers, YAML options and the import hook.

Importing this package is cheap (no torch, no LLaMA-Factory): the ``.pth`` import hook imports
``llamafactory_ext._import_hook`` at every interpreter start.  The heavy pieces are loaded on
first attribute access::

    from llamafactory_ext import PcaLlamaDistillationTrainer, MatryoshkaArguments
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "MatryoshkaArguments": "arguments",
    "PcaLlamaTrainer": "trainers",
    "PcaLlamaDistillationTrainer": "trainers",
    "PcaLlamaSeq2SeqTrainer": "trainers",
    "PcaLlamaSeq2SeqDistillationTrainer": "trainers",
    "distillation_terms": "distillation_loss",
}

__all__ = [
    "MatryoshkaArguments",
    "PcaLlamaDistillationTrainer",
    "PcaLlamaSeq2SeqDistillationTrainer",
    "PcaLlamaSeq2SeqTrainer",
    "PcaLlamaTrainer",
    "distillation_terms",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
