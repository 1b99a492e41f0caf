"""Bad input to ``memfit train`` and ``memfit demo`` ends in one clear line and a non-zero exit, never a traceback.

Each case is an invocation a new user tried (issue 16): in-process through :func:`memfit.cli.main` (fast), and two
through a real ``python -m memfit`` subprocess (the console entry point, no traceback on stderr).
"""

import subprocess
import sys

import pytest

from memfit.cli import main

TINY = ["--model", "tiny", "--batch-size", "1", "--seq-len", "8", "--steps", "1", "--quiet"]


def _one_line_error(capsys, argv, *expected, code=2):
    """``main(argv)`` exits with ``code``, writes exactly one line to stderr holding every ``expected`` text."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('steps = "ten"\n', ["steps must be an integer", "'ten'"]),
        ("batch_size = 2.5\n", ["batch_size must be an integer", "2.5"]),
        ("optimizer_args = {momentun = 0.9}\n", ["has no argument 'momentun'", "did you mean 'momentum'?"]),
        ("eval_every = -1\n", ["eval_every must be >= 0", "-1"]),
        ("model = 'tiny'\nsteps = \n", ["is not valid TOML"]),  # malformed: the message names the file
        ("learning_rate = 0.1\n", ["unknown key(s) learning_rate", "allowed:"]),
        ('optimizer = "lion"\n', ["optimizer must be one of", "sm3", "'lion'"]),
    ],
)
def test_train_config_file_errors(tmp_path, capsys, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    line = _one_line_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "o")], *expected)
    assert str(path) in line  # the file the bad key came from
    assert not (tmp_path / "o").exists()  # nothing written


def test_train_option_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    cases = [
        (
            ["--optimizer-args", "{momentum: 0.9}", *out],
            ["--optimizer-args is not JSON", '{"momentum": 0.9}'],
        ),
        (["--optimizer-args", "[0.9]", *out], ["must be a JSON object"]),
        (["--optimizer-args", '{"momentun": 0.9}', *out], ["did you mean 'momentum'?"]),
        (["--optimizer-args", '{"momentum": 2}', *out], ["momentum"]),
        (["--out", str(a_file)], ["out must be a directory", "is a file"]),
        (["--model", "cnn", *out], ["model must be a GPT preset", "tiny", "'cnn'"]),
        (["--model", "torch.nn:Linear", *out], ["model must be a GPT preset"]),
        (["--seq-len", "1000", *out], ["seq_len must be <= 64", "1000"]),
        (["--data", str(tmp_path / "missing.txt"), *out], ["does not exist"]),
        (["--batch-size", "-1", *out], ["batch_size must be >= 1", "-1"]),
        (["--lr", "-1", *out], ["lr must be a finite number >= 0"]),
        (["--lr", "nan", *out], ["lr must be a finite number >= 0"]),
        (["--eval-every", "-1", *out], ["eval_every must be >= 0"]),
        (["--keep", "0", *out], ["keep must be >= 1"]),
        (["--seed", "-3", *out], ["seed must be in [0, 9999]"]),
        (["--remat-budget", "1.5", *out], ["remat_budget must be in (0, 1]"]),
        (["--config", str(tmp_path / "none.toml"), *out], ["none.toml does not exist"]),
    ]
    for argv, expected in cases:
        _one_line_error(capsys, ["train", *TINY, *argv], *expected)
    assert not (tmp_path / "o").exists()


def test_train_infeasible_remat_budget_names_the_smallest_reachable_one(tmp_path, capsys):
    line = _one_line_error(
        capsys,
        ["train", *TINY, "--remat-budget", "0.01", "--out", str(tmp_path / "o")],
        "remat_budget 0.01 is below what this step can reach",
        "smallest reachable budget is",
    )
    smallest = float(line.split("smallest reachable budget is ")[1].split()[0])
    assert 0.01 < smallest <= 1.0
    assert not (tmp_path / "o" / "config.toml").exists()  # a run that did not start records nothing
    suggested = line.split("use a remat_budget in [")[1].split(",")[0]
    assert float(suggested) >= smallest
    assert main(["train", *TINY, "--remat-budget", suggested, "--out", str(tmp_path / "o")]) == 0  # reachable


def test_demo_option_errors(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    out = ["--out", str(tmp_path / "o")]
    cases = [
        (["--steps", "0", *out], ["--steps must be >= 1, got 0"]),
        (["--batch-size", "-2", *out], ["--batch-size must be >= 1"]),
        (["--out", str(a_file)], ["--out must be a directory", "is a file"]),
        (["--model", "nope", *out], ["--model must be a GPT preset", "mini", "'nope'"]),
        (["--model", "cnn", *out], ["--model must be a GPT preset", "'cnn'"]),
        (["--seq-len", "1000", *out], ["--seq-len must be in [1, 64]", "1000"]),
        (["--data", str(tmp_path / "missing.txt"), *out], ["--data must be a text file", "does not exist"]),
        (["--data", str(tmp_path), *out], ["is a directory"]),
        (["--seed", "-1", *out], ["--seed must be in [0, 9999]"]),
    ]
    for argv, expected in cases:
        _one_line_error(capsys, ["demo", "--quiet", *argv], *expected)
    assert not (tmp_path / "o").exists()


def test_plan_errors_without_traceback(capsys):
    """``memfit plan`` cases of the issue that already end in one line (the planner is another module's)."""
    assert main(["plan", "--model", "torch.nn:Linear", "--batch", "2"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_plan_value_errors_name_the_value(capsys):
    """``--memory 0.5`` (a forgotten unit) and ``--batch -1x5`` (a value that looks like an option) are about the value."""
    base = ["plan", "--model", "tiny", "--batch", "1x8"]
    _one_line_error(capsys, [*base, "--memory", "0.5"], "'0.5'", "no unit", "24GiB", "--remat 0.5")
    _one_line_error(capsys, [*base, "--memory", "0"], "must be positive", "'0'")
    _one_line_error(capsys, ["plan", "--model", "tiny", "--batch", "-1x5"], "'-1x5'", "BATCHxSEQ")
    _one_line_error(capsys, ["train", *TINY[:-3], "--steps", "-3", "--quiet"], "steps must be >= 1", "-3")


def test_python_dash_m_memfit_bad_input_in_a_subprocess(tmp_path):
    """The real entry point: exit status 2, one line, no traceback (``python -m memfit`` runs at all)."""
    bad = tmp_path / "a_file"
    bad.write_text("not a directory")
    # found inside train(), with the progress bar on: still one line
    for argv in (["train", "--out", str(bad)], ["demo", "--steps", "0"]):
        proc = subprocess.run(
            [sys.executable, "-m", "memfit", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), (
            proc.stderr
        )  # not even a blank line
    assert not (tmp_path / "runs").exists()
