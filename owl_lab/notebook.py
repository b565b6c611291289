"""Notebook set-up shared by every lab notebook: determinism, threads, renderers, display."""

from __future__ import annotations

import random
import warnings


def setup(seed: int = 0, threads: int = 1) -> None:
    """Make a notebook's numbers reproducible and its figures render offline.

    * seeds Python, NumPy and torch; fixes torch's intra-op threads (1 by default: the tiny models lose
      10-45× to OpenMP synchronisation with more, on a loaded 2-core machine; results can differ in the last
      bits between thread counts, and nbval compares printed numbers);
    * plotly renders as its JSON mimetype (JupyterLab draws it without a CDN);
    * pandas prints 3 decimals, so printed summaries are stable under float noise.
    """
    import numpy as np
    import pandas as pd
    import plotly.io as pio
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    pio.renderers.default = "plotly_mimetype"
    pd.set_option("display.precision", 3)
    pd.set_option("display.width", 120)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning)
