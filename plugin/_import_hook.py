"""The import hook's old address, kept for ``matryoshka_kv_hook.pth`` files written before it moved.

Installs made before the hook moved to :mod:`plugin.model.import_hook` put the line
``import plugin._import_hook as _h; _h.install()`` into site-packages; without this module such an
environment would print an import error at every interpreter start and load no PcaLlama checkpoint
through the Auto classes until reinstalled.  setup.py and scripts/install.sh write the new address.
"""

from plugin.model.import_hook import install, is_registered

__all__ = ["install", "is_registered"]
