"""``owl-lab info [PATH] [--markdown]``: shipped checkpoints with their held-out metrics, or the
family and key count of one checkpoint directory."""

from __future__ import annotations

import json

from owl_lab import zoo

COLUMNS = (
    "checkpoint",
    "family",
    "params",
    "train min",
    "image QA %",
    "caption %",
    "text %",
    "distractor N=1…32 %",
)


def add_arguments(parser):
    parser.add_argument("checkpoint", nargs="?", help="a shipped name or a checkpoint directory")
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as Markdown (for the README)"
    )


def summary_row(name: str) -> dict:
    """One checkpoint's headline numbers from its ``metrics.json`` (``-`` where it has none)."""
    path = zoo.resolve_checkpoint(name) / "metrics.json"
    m = json.loads(path.read_text()) if path.is_file() else {}

    def fmt(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    curve = m.get("distractor", {}).get("circular")
    return {
        "checkpoint": name,
        "family": zoo.detect_family(name),
        "params": f"{m['params']:,}" if "params" in m else "-",
        "train min": fmt(m["train_seconds"] / 60 if "train_seconds" in m else None),
        "image QA %": fmt(m.get("image_qa_accuracy")),
        "caption %": fmt(m.get("accuracy", {}).get("caption")),
        "text %": fmt(m.get("text_accuracy")),
        "distractor N=1…32 %": " / ".join(f"{v:.0f}" for v in curve) if curve else "-",
    }


def run(args) -> int:
    if args.checkpoint is None:
        names = zoo.list_checkpoints()
        rows = [summary_row(n) for n in names]
        if args.markdown:
            print("| " + " | ".join(COLUMNS) + " |")
            print("|" + "---|" * len(COLUMNS))
            for r in rows:
                print("| " + " | ".join(f"`{r[c]}`" if c == "checkpoint" else r[c] for c in COLUMNS) + " |")
            return 0
        print(f"shipped checkpoints in {zoo.checkpoints_dir()}:")
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in COLUMNS}
        print("  " + "  ".join(c.ljust(widths[c]) for c in COLUMNS))
        for r in rows:
            print("  " + "  ".join(r[c].ljust(widths[c]) for c in COLUMNS))
        if not names:
            print("  (none)")
        return 0
    directory = zoo.resolve_checkpoint(args.checkpoint)
    print(
        f"{directory}: family {zoo.detect_family(directory)}, {len(zoo.checkpoint_keys(directory))} tensors"
    )
    return 0
