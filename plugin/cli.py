"""``mkv``: the command-line entry point of matryoshka-kv.

Sub-commands live in their own modules, listed in :data:`COMMANDS` as
``(name, module_path, help)``.  A command module exposes

* ``add_arguments(parser: argparse.ArgumentParser) -> None``
* ``run(args: argparse.Namespace) -> int`` (the exit code)
* optionally ``DESCRIPTION`` (defaults to the module docstring) and ``EXAMPLES`` (shown
  at the end of ``mkv <command> --help``).

Command modules are imported to build the parser, so keep their top level cheap: import
torch / transformers inside ``run``.  To add a command, write ``plugin/commands/<name>.py``
and append one line to :data:`COMMANDS`.

Bad input (``ValueError``, ``FileNotFoundError``) is reported as one line,
``mkv: error: ...``, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence

#: (name, module path, one-line help) of every sub-command, in --help order.
COMMANDS: list[tuple[str, str, str]] = [
    ("info", "plugin.commands.info", "show versions, device and embedded assets"),
    ("demo", "plugin.commands.demo", "perplexity and KV-cache size of the embedded model"),
    ("calibrate", "plugin.commands.calibrate", "PCA-initialise a PcaLlama checkpoint from calibration text"),
    ("eval", "plugin.commands.eval", "perplexity and cache bytes at a sweep of KV budgets"),
    ("search-budget", "plugin.commands.search_budget", "greedy KL search of per-head K/V ranks for a budget"),
    ("export-projections", "plugin.commands.export_projections",
     "write a PcaLlama's K/V projections as a small artifact for its base"),
]

EXAMPLES = """\
examples:
  mkv info                     versions, device, embedded model/corpus state
  mkv demo                     perplexity of SmolLM2-135M on held-out SOTU text
  mkv demo --tokens 4096       a quicker run
  mkv <command> --help         options and examples of one command
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mkv",
        description="MatryoshkaKV: trainable orthogonal KV-cache compression "
        "(LLaMA-Factory + OpenCompass plugin).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module_path, help_text in COMMANDS:
        module = importlib.import_module(module_path)
        description = getattr(module, "DESCRIPTION", None) or (module.__doc__ or help_text)
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=description.strip(),
            epilog=getattr(module, "EXAMPLES", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "mkv " + shlex.join(sys.argv[1:] if argv is None else argv)  # recorded with results
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"mkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
