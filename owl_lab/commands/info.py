"""``owl-lab info [PATH]``: shipped checkpoints, or the family and key count of a directory."""
from __future__ import annotations

from owl_lab import zoo


def add_arguments(parser):
    parser.add_argument("checkpoint", nargs="?", help="a shipped name or a checkpoint directory")


def run(args) -> int:
    if args.checkpoint is None:
        names = zoo.list_checkpoints()
        print(f"shipped checkpoints in {zoo.checkpoints_dir()}:")
        for name in names:
            print(f"  {name:24s} {zoo.detect_family(name)}")
        if not names:
            print("  (none)")
        return 0
    directory = zoo.resolve_checkpoint(args.checkpoint)
    print(f"{directory}: family {zoo.detect_family(directory)}, {len(zoo.checkpoint_keys(directory))} tensors")
    return 0
