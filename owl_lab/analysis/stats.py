"""Small-sample statistics for accuracy comparisons: is a difference bigger than the noise?

Accuracies here are exact-match rates over a few hundred seeded examples, so a difference of a few
points can be chance. Two tools:

* :func:`binomial_se` — standard error of one accuracy, ``sqrt(p (1 - p) / n)``;
* :func:`paired_difference` — two models (or conditions) scored on the *same* examples: the difference
  of their accuracies and its paired standard error ``std(d) / sqrt(n)`` with ``d_i = a_i - b_i``
  (∈ {-1, 0, 1} for correct/incorrect flags). Pairing removes the per-example difficulty both share,
  so it is usually tighter than combining two independent errors (also reported, ``se_unpaired``).
  Values need not be flags: per-example *drops* (``with_image_i - without_image_i``) compare too.

Everything is in percentage points (0–100), like :mod:`owl_lab.evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _flags(x: Sequence, name: str) -> list[float]:
    vals = [float(v) for v in x]  # bools → 0.0 / 1.0
    if not vals:
        raise ValueError(f"{name} is empty: expected a sequence of per-example values (e.g. correct flags)")
    return vals


def _se(vals: list[float]) -> float:
    """Standard error of the mean (sample variance, n - 1); 0 for one value."""
    n = len(vals)
    if n < 2:
        return 0.0
    mean = sum(vals) / n
    return math.sqrt(sum((x - mean) ** 2 for x in vals) / (n - 1) / n)


def binomial_se(flags_or_p, n: int | None = None) -> float:
    """Standard error (points) of an accuracy: ``binomial_se(flags)`` or ``binomial_se(p_percent, n)``."""
    if n is None:
        vals = _flags(flags_or_p, "flags")
        p, n = sum(vals) / len(vals), len(vals)
    else:
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        p = float(flags_or_p) / 100.0
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"accuracy must be a percentage in [0, 100], got {flags_or_p}")
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def paired_difference(a: Sequence, b: Sequence, k: float = 2.0) -> dict:
    """Mean of ``a`` minus mean of ``b`` on the same examples (in points), with its standard error.

    Args:
        a, b: per-example values, same length and order: correct flags (bool/0/1) or e.g. drops.
        k: how many standard errors count as "beyond noise".

    Returns:
        dict with ``a``, ``b`` (the two means ×100, i.e. accuracies in %), ``diff``, ``se`` (paired),
        ``se_unpaired`` (as if independent), ``z = diff / se`` (±inf when se is 0 and diff is not),
        ``n``, and ``beyond_noise`` = |diff| > k·se.
    """
    fa, fb = _flags(a, "a"), _flags(b, "b")
    if len(fa) != len(fb):
        raise ValueError(f"paired values must have the same length: got {len(fa)} and {len(fb)}")
    n = len(fa)
    d = [x - y for x, y in zip(fa, fb, strict=True)]
    diff, se = 100.0 * sum(d) / n, 100.0 * _se(d)
    if se > 0:
        z = diff / se
    else:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return {
        "a": 100.0 * sum(fa) / n,
        "b": 100.0 * sum(fb) / n,
        "diff": diff,
        "se": se,
        "se_unpaired": 100.0 * math.hypot(_se(fa), _se(fb)),
        "z": z,
        "n": n,
        "beyond_noise": abs(diff) > k * se,
    }


__all__ = ["binomial_se", "paired_difference"]
