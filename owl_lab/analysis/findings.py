"""From measured comparisons to stated findings: one verdict rule, written once.

A *finding* is a paper's claim (or, for exploration, our hypothesis) next to what we measured: one
signed effect per training seed (or seed pair), each with its standard error and its number of
examples, oriented so that a **positive effect is the claim's direction**. :func:`judge` turns the
effects into one verdict; :func:`findings_table` prints the notebook's closing "What we found" table.

The rule (``k = 2`` standard errors, ``MIN_N = 50`` examples):

* each seed's effect is **for** the claim when ``effect > k·SE``, **against** it when
  ``effect < −k·SE``, and **within noise** otherwise;
* **reproduced**: every seed is *for* the claim;
* **opposite**: every seed is *against* it;
* **not reproduced**: no seed is *for* it, not every seed is *against* it, and the data could have
  seen the claimed effect: every seed has ``n ≥ MIN_N`` and, when the claim names a size
  (``expected``, in the effect's units), every seed's upper bound ``effect + k·SE`` lies below it;
* **inconclusive**: everything else — seeds that disagree (one *for*, another *against* or within
  noise), or null results on too little data to have seen the claim.

A verdict is also flagged (``caveats``) when it rests on one seed or on fewer than ``MIN_N``
examples in some seed: such a verdict says what this draw shows, not what the design does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

K = 2.0
MIN_N = 50
VERDICTS = ("reproduced", "not reproduced", "opposite", "inconclusive")


@dataclass(frozen=True)
class Effect:
    """One measured effect, oriented so that positive = the claim's direction.

    Attributes:
        value: the effect (e.g. accuracy points, or a share difference).
        se: its standard error (same units, ≥ 0).
        n: number of examples it rests on.
        label: which draw it is, e.g. ``"seed 0"``.
    """

    value: float
    se: float
    n: int
    label: str = ""

    def __post_init__(self):
        if not (math.isfinite(self.value) and math.isfinite(self.se)):
            raise ValueError(f"effect and SE must be finite numbers; got {self.value!r} ± {self.se!r}")
        if self.se < 0:
            raise ValueError(f"a standard error cannot be negative; got {self.se}")
        if int(self.n) < 1:
            raise ValueError(f"an effect needs at least one example; got n = {self.n}")

    def side(self, k: float = K) -> str:
        """'for', 'against' or 'noise' (|effect| ≤ k·SE)."""
        if self.value > k * self.se:
            return "for"
        if self.value < -k * self.se:
            return "against"
        return "noise"


def from_paired(d: Mapping, label: str = "", *, scale: float = 1.0, sign: int = 1) -> Effect:
    """An :class:`Effect` from :func:`owl_lab.analysis.stats.paired_difference`'s dict.

    ``scale`` converts units (e.g. 0.01 for shares computed as ×100), ``sign=-1`` flips the
    orientation when the claim predicts a decrease.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1; got {sign}")
    return Effect(sign * scale * float(d["diff"]), scale * float(d["se"]), int(d["n"]), label)


def from_samples(values: Sequence[float], label: str = "", *, sign: int = 1) -> Effect:
    """Mean of per-example values (e.g. per-image paired differences) with its standard error."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1; got {sign}")
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("from_samples needs at least one value")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return Effect(sign * float(x.mean()), se, int(x.size), label)


def judge(
    effects: Sequence[Effect], *, expected: float | None = None, k: float = K, min_n: int = MIN_N
) -> tuple[str, list[str]]:
    """The verdict for a claim measured on several seeds (see the module docstring): (verdict, caveats).

    Args:
        effects: one :class:`Effect` per seed (or seed pair), positive = the claim's direction.
        expected: the size the claim predicts (positive, effect units), if it names one; a null result
            counts as *not reproduced* only if every seed's upper bound is below it.
        k: standard errors that count as beyond noise.
        min_n: fewer examples than this in any seed makes a null result *inconclusive*.
    """
    effects = list(effects)
    if not effects:
        raise ValueError("judge needs at least one effect")
    if expected is not None and not expected > 0:
        raise ValueError(
            f"expected is the claimed effect size, oriented like the effects: > 0; got {expected}"
        )
    sides = [e.side(k) for e in effects]
    enough = all(e.n >= min_n for e in effects)
    if expected is not None:
        enough = enough and all(e.value + k * e.se < expected for e in effects)
    if all(s == "for" for s in sides):
        verdict = "reproduced"
    elif all(s == "against" for s in sides):
        verdict = "opposite"
    elif "for" not in sides and enough:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    caveats = []
    if len(effects) == 1:
        caveats.append("one seed")
    if any(e.n < min_n for e in effects):
        caveats.append(f"n < {min_n}")
    return verdict, caveats


@dataclass
class Finding:
    """One row of a "What we found" table (see :func:`finding`)."""

    claim: str
    source: str
    effects: list[Effect]
    verdict: str
    caveats: list[str]
    interpretation: str
    digits: int = 1
    units: str = ""
    extra: dict = field(default_factory=dict)

    def ours(self) -> str:
        """'+4.3 ± 0.6 (seed 0); +2.1 ± 0.6 (seed 1)' with this finding's rounding."""
        f = f"{{:+.{self.digits}f}} ± {{:.{self.digits}f}}"
        parts = [f.format(e.value, e.se) + (f" ({e.label})" if e.label else "") for e in self.effects]
        return "; ".join(parts) + (f" {self.units}" if self.units else "")

    def seeds(self) -> str:
        """'2 of 2 for' — how many seeds are beyond k SE in the claim's direction."""
        n_for = sum(e.side() == "for" for e in self.effects)
        return f"{n_for} of {len(self.effects)} for"


def finding(
    claim: str,
    source: str,
    effects: Sequence[Effect],
    interpretation: str | Mapping[str, str],
    *,
    expected: float | None = None,
    digits: int = 1,
    units: str = "",
    k: float = K,
    min_n: int = MIN_N,
) -> Finding:
    """Judge one claim and attach its interpretation.

    Args:
        claim: the claim in a few words, e.g. "the MAM raises image-task accuracy".
        source: where it is from, e.g. "Owl2 Table 5" or "exploration (no paper claim)".
        effects: one :class:`Effect` per seed, positive = the claim's direction.
        interpretation: one sentence the numbers support; or a dict ``{verdict: sentence}`` so the
            sentence follows the computed verdict when a retrain changes it (a verdict without a
            sentence prints a note saying so instead of a stale sentence).
        expected, k, min_n: see :func:`judge`.
        digits, units: how ``ours`` is printed.
    """
    verdict, caveats = judge(effects, expected=expected, k=k, min_n=min_n)
    if isinstance(interpretation, Mapping):
        unknown = set(interpretation) - set(VERDICTS)
        if unknown:
            raise ValueError(f"interpretation keys must be verdicts {VERDICTS}; got {sorted(unknown)}")
        text = interpretation.get(
            verdict, f"(no sentence written for the verdict '{verdict}': read the numbers)"
        )
    else:
        text = str(interpretation)
    return Finding(claim, source, list(effects), verdict, caveats, text, digits, units)


#: Sentences that follow the verdict of a claim measured on the training seeds of one model
#: (:func:`per_model`); a notebook overrides the ones its numbers say more about.
SEEDS_TEXT = {
    "reproduced": "Holds beyond 2 SE on every seed of this model.",
    "opposite": "The opposite holds beyond 2 SE on every seed of this model.",
    "not reproduced": "No seed of this model shows it beyond 2 SE.",
    "inconclusive": "The seeds of this model disagree, or the effect is within noise on one of them.",
}


def per_model(
    claim: str,
    source: str,
    checkpoints: Mapping[str, Sequence[str]],
    measure: Callable[[str], Effect | Sequence[float]],
    interpretation: str | Mapping[str, str] = SEEDS_TEXT,
    **kwargs,
) -> list[Finding]:
    """One finding per model, each judged on that model's training seeds.

    Args:
        claim: the claim; each row's claim is ``"{claim} — {model}"``.
        source: where the claim is from (a paper, "method check", "exploration ...").
        checkpoints: model label → its checkpoints, one per training seed, e.g.
            ``{"owl2": ["owl2-tiny", "owl2-tiny-s1"]}``.
        measure: checkpoint → its per-example values (positive = the claim's direction; mean ± SE by
            :func:`from_samples`), or a ready :class:`Effect` (e.g. one with a bootstrap SE).
        interpretation, kwargs: as in :func:`finding` (``expected``, ``digits``, ``units``, ...).

    Returns:
        one :class:`Finding` per model, effects labelled ``"seed 0"``, ``"seed 1"``, ... in the given order.
    """
    if not checkpoints:
        raise ValueError("per_model needs at least one model with its checkpoints")
    rows = []
    for model, names in checkpoints.items():
        if isinstance(names, str) or not names:
            raise ValueError(f"checkpoints[{model!r}] must be a list of checkpoint names; got {names!r}")
        effects = []
        for seed, name in enumerate(names):
            measured = measure(name)
            label = f"seed {seed}"
            effect = measured if isinstance(measured, Effect) else from_samples(measured, label)
            effects.append(replace(effect, label=effect.label or label))
        rows.append(finding(f"{claim} — {model}", source, effects, interpretation, **kwargs))
    return rows


def findings_table(
    rows: Sequence[Finding], *, title: str = "What we found", show: bool = True
) -> pd.DataFrame:
    """The closing table of a reproduction notebook; prints a compact, rounded text form.

    Returns:
        DataFrame with columns claim, source, ours (effect ± SE per seed), n (examples per seed),
        seeds (how many are beyond 2 SE for the claim), verdict, caveats, interpretation.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("findings_table needs at least one finding")
    table = pd.DataFrame(
        [
            {
                "claim": r.claim,
                "source": r.source,
                "ours": r.ours(),
                "n": "/".join(str(e.n) for e in r.effects),
                "seeds": r.seeds(),
                "verdict": r.verdict,
                "caveats": ", ".join(r.caveats),
                "interpretation": r.interpretation,
            }
            for r in rows
        ]
    )
    if show:
        print(format_findings(table, title=title))
    return table


def format_findings(table: pd.DataFrame, *, title: str = "What we found") -> str:
    """The text form :func:`findings_table` prints (one block per claim; stable under nbval)."""
    lines = [f"{title} (a claim is reproduced only if it holds beyond {K:g} SE on every seed)"]
    for i, r in enumerate(table.itertuples(index=False), start=1):
        lines.append(f"{i}. {r.claim} [{r.source}]")
        lines.append(f"   ours: {r.ours} (n = {r.n})")
        lines.append(f"   verdict: {r.verdict} ({r.seeds})" + (f"; caveat: {r.caveats}" if r.caveats else ""))
        lines.append(f"   {r.interpretation}")
    return "\n".join(lines)


_CLAIM = re.compile(r"^(\d+)\. (.*) \[([^\[\]]*(?:\([^()]*\))?[^\[\]]*)\]$")
_OURS = re.compile(r"^   ours: (.*) \(n = ([\d/]+)\)$")
_VERDICT = re.compile(
    r"^   verdict: (reproduced|not reproduced|opposite|inconclusive) \((\d+ of \d+ for)\)"
    r"(?:; caveat: (.*))?$"
)


def parse_findings(text: str) -> list[dict]:
    """The findings blocks in a printed "What we found" table (the inverse of :func:`format_findings`).

    Returns one dict per claim: claim, source, ours, n, seeds, verdict, caveats, interpretation.
    """
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        m = _CLAIM.match(line)
        if not m or i + 3 >= len(lines):
            continue
        ours, verdict = _OURS.match(lines[i + 1]), _VERDICT.match(lines[i + 2])
        if not (ours and verdict):
            continue
        out.append(
            {
                "claim": m.group(2),
                "source": m.group(3),
                "ours": ours.group(1),
                "n": ours.group(2),
                "verdict": verdict.group(1),
                "seeds": verdict.group(2),
                "caveats": verdict.group(3) or "",
                "interpretation": lines[i + 3].strip(),
            }
        )
    return out


def notebook_findings(path) -> list[dict]:
    """Every finding a committed notebook printed (its stored outputs, not a re-run), in order."""
    nb = json.loads(Path(path).read_text())
    found = []
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            text = "".join(output.get("text", "")) if output.get("output_type") == "stream" else ""
            if "What we found" in text:
                found += parse_findings(text)
    return found


def claims_markdown(notebooks) -> str:
    """The README's claims table: one row per finding of the given notebooks (paths), in order."""
    rows = ["| claim | source | ours (effect ± SE per seed) | verdict | notebook |", "|---|---|---|---|---|"]
    for path in notebooks:
        name = Path(path).name
        for f in notebook_findings(path):
            verdict = f["verdict"] + (f" ({f['caveats']})" if f["caveats"] else "")
            cells = [f["claim"], f["source"], f["ours"], verdict]
            cells = [c.replace("|", "\\|") for c in cells]  # a literal | (e.g. |IG|) would split the cell
            rows.append("| " + " | ".join(cells) + f" | [{name[:2]}](notebooks/{name}) |")
    return "\n".join(rows)


__all__ = [
    "Effect",
    "Finding",
    "K",
    "MIN_N",
    "SEEDS_TEXT",
    "VERDICTS",
    "claims_markdown",
    "findings_table",
    "finding",
    "format_findings",
    "from_paired",
    "from_samples",
    "judge",
    "notebook_findings",
    "parse_findings",
    "per_model",
]
