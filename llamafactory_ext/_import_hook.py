"""Post-import hook that plugs the Matryoshka trainers into LLaMA-Factory, in every process.

``matryoshka_kv_llamafactory.pth`` (installed into site-packages beside the core's
``matryoshka_kv_hook.pth``) runs, at every interpreter start of the environment::

    import llamafactory_ext._import_hook as _h; _h.install()

:func:`install` puts a :class:`~plugin.model.post_import.PostImportFinder` at the front of
``sys.meta_path``, watching only the few LLaMA-Factory modules listed in :data:`TARGETS`: right
after one has executed, :func:`llamafactory_ext.patches.apply` patches it:

* ``llamafactory.hparams.parser``: the train / infer / eval parsers also parse
  :class:`~llamafactory_ext.arguments.MatryoshkaArguments` (``matryoshka_*`` YAML keys);
* ``llamafactory.model.loader``: ``init_adapter`` freezes the base model and keeps only the KV
  projections (+ LoRA) trainable for Matryoshka runs, and loads projections saved next to a
  LoRA adapter;
* ``llamafactory.train.pt.workflow`` / ``llamafactory.train.sft.workflow``: ``CustomTrainer`` /
  ``CustomSeq2SeqTrainer`` are replaced, in the workflow module's namespace only, by a factory
  that builds the Matryoshka trainer for PcaLlama models (or when the YAML asks for it) and
  LLaMA-Factory's own trainer otherwise;
* ``llamafactory.chat.hf_engine``: the chat engine of ``chat`` / ``api`` / ``webchat`` applies the
  inference keys (KV budget or rank file, bits, eviction) to the model it loaded;
* ``llamafactory.api.app``: ``/v1/chat/completions`` checks a request to a served PcaLlama first
  (model name, messages, max_tokens against the context) and answers a bad one with an error.

So plain ``llamafactory-cli train x.yaml`` uses the Matryoshka trainers, also in the fresh
interpreters of ``FORCE_TORCHRUN=1`` and the ``deepspeed`` launcher, without a fork of
LLaMA-Factory and without a wrapper command.

Rules: only standard-library modules are imported at interpreter start (no torch, no llamafactory);
``install()`` is idempotent and never raises; a failing patch is reported as one warning line
and never breaks the import of the LLaMA-Factory module.  ``MKV_DISABLE_LLAMAFACTORY_HOOK=1``
switches the hook off.
"""

from __future__ import annotations

import os
import sys

from plugin.model.post_import import PostImportFinder, module_executed

TARGETS = (
    "llamafactory.hparams.parser",
    "llamafactory.model.loader",
    "llamafactory.train.pt.workflow",
    "llamafactory.train.sft.workflow",
    "llamafactory.chat.hf_engine",
    "llamafactory.api.app",
)

_state = {"installed": False}
_patched: set[str] = set()


def _warn(message: str) -> None:
    import logging

    logging.getLogger("matryoshka_kv").warning("matryoshka-kv LLaMA-Factory hook: %s", message)


def _patch(fullname: str) -> None:
    """Patch one executed target module (at most once per process); never raises."""
    if fullname in _patched:
        return
    module = sys.modules.get(fullname)
    if module is None:
        return
    _patched.add(fullname)
    try:
        from llamafactory_ext import patches

        patches.apply(fullname, module)
    except Exception as exc:  # noqa: BLE001 - reported, never raised into the importer
        _warn(f"patching {fullname} failed: {type(exc).__name__}: {exc}")


def install() -> None:
    """Install the finder (idempotent, never raises).  Called from the .pth file.

    Target modules that were imported before (e.g. ``install()`` called by hand in a session
    that already imported LLaMA-Factory) are patched at once.
    """
    try:
        if os.environ.get("MKV_DISABLE_LLAMAFACTORY_HOOK", "").strip() not in ("", "0"):
            return
        if not _state["installed"]:
            _state["installed"] = True
            sys.meta_path.insert(0, PostImportFinder(TARGETS, _patch, _warn))
        for name in TARGETS:
            if module_executed(name):
                _patch(name)
    except Exception as exc:  # noqa: BLE001 - must never break interpreter start
        try:
            sys.stderr.write(f"matryoshka-kv: LLaMA-Factory hook not installed: {type(exc).__name__}: {exc}\n")
        except Exception:  # noqa: BLE001, S110 - stderr itself may be unusable at start-up
            pass
