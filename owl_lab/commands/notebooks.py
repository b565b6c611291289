"""``owl-lab notebooks``: execute every notebook in ``notebooks/`` headless, in order."""

from __future__ import annotations

import time
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--dir", default=None, help="notebooks folder (default: the project's notebooks/)")
    parser.add_argument("--out", default=None, help="write executed copies here instead of in place")
    parser.add_argument("--timeout", type=int, default=600, help="per-cell timeout in seconds")
    parser.add_argument("pattern", nargs="?", default="*.ipynb", help="glob, e.g. '0[0-3]*.ipynb'")


def run(args) -> int:
    import nbformat
    from nbclient import NotebookClient

    folder = Path(args.dir) if args.dir else Path(__file__).resolve().parents[2] / "notebooks"
    out = Path(args.out) if args.out else None
    paths = sorted(folder.glob(args.pattern))
    if not paths:
        print(f"no notebooks matching {args.pattern!r} in {folder}")
        return 1
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=args.timeout, resources={"metadata": {"path": str(folder)}}).execute()
        # saved ipywidgets state is hundreds of kB of slider/figure models that only a live kernel can
        # use; without it JupyterLab shows "run the cell" for each widget until the notebook is re-run
        nb.metadata.pop("widgets", None)
        target = (out / path.name) if out else path
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        print(f"{path.name}: {time.perf_counter() - start:.1f} s -> {target}")
    return 0
