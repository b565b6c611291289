"""`owl-lab --help` lists every subcommand, and each one parses."""

from __future__ import annotations

from owl_lab import cli


def test_help_lists_every_subcommand(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert set(cli.SUBCOMMANDS) == {"info", "train", "eval", "reproduce", "bench", "notebooks"}
    for name in cli.SUBCOMMANDS:
        assert f"    {name}" in out, (name, out)


def test_info_runs(capsys, owl2_golden_dir):
    assert cli.main(["info", str(owl2_golden_dir)]) == 0
    assert "family owl2" in capsys.readouterr().out


def test_info_lists_shipped_checkpoints_with_their_metrics(capsys):
    import json

    from owl_lab import zoo

    assert cli.main(["info", "--markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = zoo.list_checkpoints()
    assert out[0].startswith("| checkpoint | family |") and len(out) == 2 + len(names)
    for name, line in zip(names, out[2:], strict=True):
        metrics = json.loads((zoo.checkpoints_dir() / name / "metrics.json").read_text())
        assert f"`{name}`" in line and f"{metrics['image_qa_accuracy']:.1f}" in line
    assert cli.main(["info"]) == 0
    plain = capsys.readouterr().out
    assert all(name in plain for name in names)
