"""Packaging for matryoshka-kv (plugin + LLaMA-Factory / OpenCompass extensions).

Besides the three packages, the distribution installs ``matryoshka_kv_hook.pth`` into
site-packages.  Its single line, ``import plugin.model.import_hook as _h; _h.install()``, puts a
cheap ``sys.meta_path`` finder in every interpreter of the environment, which registers the
``pcallama`` model type with transformers' Auto classes as soon as transformers' auto
modules are imported.  That is how LLaMA-Factory, its torchrun / deepspeed children and
OpenCompass subprocesses load PcaLlama checkpoints without ever importing ``plugin``.

How the .pth file gets into site-packages:

* ``pip install .`` (regular wheel): ``BuildPyWithPth`` copies it to the root of
  ``build_lib``; the wheel's root is installed into site-packages.
* ``pip install -e .`` (PEP 660, setuptools >= 64): ``editable_wheel`` builds into a
  throw-away ``build_lib`` and only maps the source tree, so ``BuildPyWithPth`` writes the
  .pth into the unpacked editable wheel (``install.install_lib``) instead, whose root is
  installed into site-packages as well.
* ``scripts/install.sh`` additionally checks that the file is in the venv's site-packages
  and writes it there (idempotently) if an old pip / setuptools took the legacy
  ``setup.py develop`` path, which carries no files.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# .pth files installed at the site-packages root: the core hook (registers pcallama with
# transformers) and the LLaMA-Factory hook (Matryoshka arguments and trainers).
PTH_FILES = {
    "matryoshka_kv_hook.pth": "import plugin.model.import_hook as _h; _h.install()\n",
    "matryoshka_kv_llamafactory.pth": (HERE / "llamafactory_ext" / "matryoshka_kv_llamafactory.pth").read_text(),
}


def read_requirements(path: Path) -> tuple[list[str], list[str]]:
    """(runtime, dev) requirement lines of ``requirements.txt``.

    Comments, blanks and pip options are dropped; lines after the ``# [dev]`` comment are
    test / lint tools and go into the ``dev`` extra.
    """
    runtime: list[str] = []
    dev: list[str] = []
    current = runtime
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.strip().startswith("# [dev]"):
            current = dev
            continue
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            current.append(line)
    return runtime, dev


INSTALL_REQUIRES, DEV_REQUIRES = read_requirements(HERE / "requirements.txt")


class BuildPyWithPth(build_py):
    """build_py that also ships the import-hook .pth file at the site-packages root."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # PEP 660: build_lib is discarded; the install dir is the unpacked wheel root.
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib
        os.makedirs(target_dir, exist_ok=True)
        for name, line in PTH_FILES.items():
            with open(os.path.join(target_dir, name), "w", encoding="utf-8") as fh:
                fh.write(line)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs += [os.path.join(self.build_lib, name) for name in PTH_FILES]
        return outputs


setup(
    name="matryoshka-kv",
    version="0.1.0",
    description="MatryoshkaKV: trainable orthogonal KV-cache compression "
    "(LLaMA-Factory + OpenCompass plugin)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8")
    if (HERE / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=[
            "plugin",
            "plugin.*",
            "llamafactory_ext",
            "llamafactory_ext.*",
            "opencompass_ext",
            "opencompass_ext.*",
        ],
        exclude=["tests", "tests.*"],
    ),
    # torch and deepspeed are deliberately absent: scripts/install.sh installs them
    # (torch first, so no CUDA build is pulled in; deepspeed with --no-build-isolation).
    # The shipped projections of the embedded model (`mkv eval --model embedded-matryoshka`).
    package_data={"plugin": ["trained/*/*.json", "trained/*/*.safetensors"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES},
    entry_points={"console_scripts": ["mkv = plugin.cli:main"]},
    cmdclass={"build_py": BuildPyWithPth},
    zip_safe=False,
)
