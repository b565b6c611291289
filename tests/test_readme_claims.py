"""The README's claims table says exactly what the committed reproduction notebooks print.

The table is generated from the notebooks' stored "What we found" outputs
(``owl_lab.analysis.findings.claims_markdown``); re-executing a notebook that changes a verdict or a
number without updating the README fails here. To update: paste the output of
``python -c "from tests.test_readme_claims import expected_table; print(expected_table())"``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from owl_lab.analysis.findings import claims_markdown, notebook_findings

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Which paper claims hold at toy scale"
#: notebooks that end with a findings table: the paper reproductions 03–11, the causal-method notebooks 13–16
#: (knockout, patching, logit lens and pruning, answer → pixels) and the comparison notebook 17
REPRODUCTION_NUMBERS = [*range(3, 12), *range(13, 18)]
REPRODUCTION = [
    p for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if int(p.name[:2]) in REPRODUCTION_NUMBERS
]


def expected_table() -> str:
    return claims_markdown(REPRODUCTION)


def _section(readme: str) -> str:
    assert SECTION in readme, f"README.md has no section {SECTION!r}"
    body = readme.split(SECTION, 1)[1]
    return body.split("\n## ", 1)[0]


def test_every_reproduction_notebook_ends_with_a_findings_table():
    assert [p.name[:2] for p in REPRODUCTION] == [f"{i:02d}" for i in REPRODUCTION_NUMBERS]
    empty = [p.name for p in REPRODUCTION if not notebook_findings(p)]
    assert not empty, f"notebooks without a printed 'What we found' table: {empty}"


def test_readme_claims_table_matches_the_notebooks():
    table = _section((ROOT / "README.md").read_text())
    rows = [line for line in table.splitlines() if line.startswith("|")]
    want = expected_table().splitlines()
    diff = "\n".join(difflib.unified_diff(rows, want, "README.md", "notebooks", lineterm=""))
    assert rows == want, f"the README's claims table drifted from the notebooks' outputs:\n{diff}"
