"""The command line: what a newcomer meets first."""

import subprocess
import sys

import pytest

from memfit import __version__
from memfit.cli import main


def test_demo_says_what_exists_and_does_not_pretend_to_train(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "not built yet" in out
    for api in ("memfit.memory.track", "memfit.optim.SM3", "memfit.remat.solve"):
        assert api in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: memfit" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_reports_version():
    out = subprocess.run(
        [sys.executable, "-m", "memfit.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"memfit {__version__}"


def test_unknown_subpackage_attribute_raises():
    import memfit

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = memfit.nope
