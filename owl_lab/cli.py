"""``owl-lab`` command line. Each subcommand lives in the module that implements it.

Only subcommands whose implementation is present are registered, so ``owl-lab --help`` never lists
a command that does not work.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → (module, one-line help). The module provides ``add_arguments(parser)`` and
# ``run(args) -> int``.
SUBCOMMANDS = {
    "info": ("owl_lab.commands.info", "list shipped checkpoints and the family of a checkpoint directory"),
    "train": ("owl_lab.commands.train", "train a tiny Owl from a recipe file (data/recipes/*.json)"),
    "eval": ("owl_lab.commands.evaluate", "recompute the held-out metrics of a shipped checkpoint"),
    "reproduce": ("owl_lab.commands.reproduce", "retrain every shipped checkpoint from its recipe"),
    "bench": ("owl_lab.commands.bench", "time and peak memory of hooks.capture vs plain forward"),
    "notebooks": ("owl_lab.commands.notebooks", "execute all notebooks headless (in place or to a folder)"),
}


def _available():
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # not implemented (yet): do not advertise it
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        yield name, module, help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="owl-lab", description="mPLUG-Owl interpretability lab")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in _available():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
