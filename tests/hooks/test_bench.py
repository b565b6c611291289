"""``owl-lab bench --quick``: the command runs end to end and writes a well-formed CSV."""
from __future__ import annotations

import csv

from owl_lab import cli


def test_bench_quick_writes_csv(tmp_path, capsys):
    path = tmp_path / "bench.csv"
    assert cli.main(["bench", "--quick", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert {(r["family"], r["mode"]) for r in rows} == {
        (f, m) for f in ("owl2", "owl3") for m in ("plain", "capture", "eager")
    }
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert float(r["seconds"]) > 0 and float(r["peak_mb"]) >= 0
        if r["mode"] == "plain":
            assert float(r["time_ratio"]) == 1.0
    assert "capture" in capsys.readouterr().out
