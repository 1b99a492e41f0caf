"""The ``memfit`` command line: parsing, plan output (table and JSON), errors."""

import argparse
import json

import pytest

from memfit.cli import build_parser, main
from memfit.cli._plan import parse_batch


def test_parse_batch():
    assert parse_batch("8x1024") == (8, 1024)
    assert parse_batch("8") == (8, None)
    for bad in ("8x", "x8", "0x10", "eight"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_batch(bad)


def test_help_lists_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("demo", "plan"):
        assert cmd in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan"])  # --model and --batch are required


def _plan(optimizers, *extra):
    """``memfit plan`` of the tiny preset at batch 2x16 in 1 GiB, without remat."""
    args = ["plan", "--model", "tiny", "--batch", "2x16", "--memory", "1GiB"]
    return main([*args, "--optimizers", optimizers, "--remat", "none", *extra])


def test_plan_json_and_table(capsys):
    assert _plan("adam,sm3", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch_size"] == 2 and data["seq_len"] == 16 and data["memory"] == 2**30
    rows = {r["optimizer"]: r for r in data["rows"]}
    assert set(rows) == {"adam", "sm3"} and all(r["fits"] for r in rows.values())
    assert rows["sm3"]["breakdown"]["optimizer_state"] < rows["adam"]["breakdown"]["optimizer_state"] / 50
    assert _plan("sm3") == 0
    out = capsys.readouterr().out
    assert "fastest that fits" in out and "sm3" in out


def test_plan_errors_are_clear(capsys):
    assert main(["plan", "--model", "nope", "--batch", "2x16"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--batch", "2x16", "--memory", "lots"]) == 2
    assert "cannot read 'lots'" in capsys.readouterr().err
