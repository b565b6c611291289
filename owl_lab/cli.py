"""``owl-lab`` command line. Each subcommand lives in the module that implements it
(``owl_lab.commands.<name>``: ``add_arguments(parser)`` and ``run(args) -> int``)."""

from __future__ import annotations

import argparse
import sys

from owl_lab.commands import bench, evaluate, info, notebooks, reproduce, train

# subcommand → (module, one-line help)
SUBCOMMANDS = {
    "info": (info, "list shipped checkpoints and the family of a checkpoint directory"),
    "train": (train, "train a tiny Owl from a recipe file (data/recipes/*.json)"),
    "eval": (evaluate, "recompute the held-out metrics of a shipped checkpoint"),
    "reproduce": (reproduce, "retrain every shipped checkpoint from its recipe"),
    "bench": (bench, "time and peak memory of hooks.capture vs plain forward"),
    "notebooks": (notebooks, "execute all notebooks headless (in place or to a folder)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="owl-lab", description="mPLUG-Owl interpretability lab")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
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
