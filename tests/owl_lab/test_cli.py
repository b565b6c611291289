"""`owl-lab --help` lists only subcommands whose implementation exists, and each one parses."""
from __future__ import annotations

import importlib

from owl_lab import cli


def test_help_lists_only_existing_subcommands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name, (module_name, _) in cli.SUBCOMMANDS.items():
        exists = importlib.util.find_spec(module_name) is not None
        assert (f"    {name}" in out) == exists, (name, exists, out)


def test_info_runs(capsys, owl2_golden_dir):
    assert cli.main(["info", str(owl2_golden_dir)]) == 0
    assert "family owl2" in capsys.readouterr().out
