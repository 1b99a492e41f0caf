"""The ``memfit`` command line: ``memfit demo``, ``memfit plan``, ``memfit train``.

Each subcommand lives in its own module (``_demo``, ``_plan``, ``_train``) with an ``add_parser`` that registers
its options and a ``run(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from memfit import __version__
from memfit.cli import _demo, _plan, _train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``memfit`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="memfit", description="Train deep networks in less memory, and see what it costs in time."
    )
    parser.add_argument("--version", action="version", version=f"memfit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _demo.add_parser(sub)
    _plan.add_parser(sub)
    _train.add_parser(sub)
    return parser


def _value_options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(options that take one value, every option string) of ``parser`` and its subcommands."""
    takes_value: set[str] = set()
    every: set[str] = set()
    for action in parser._actions:
        every.update(action.option_strings)
        if action.option_strings and action.nargs is None and action.const is None:
            takes_value.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub_value, sub_every = _value_options(sub)
                takes_value |= sub_value
                every |= sub_every
    return takes_value, every


def _attach_dash_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--batch -1x5`` -> ``--batch=-1x5``, so that the option's own check says what is wrong with the value.

    argparse takes a value that starts with ``-`` (and is not a plain negative number) for an option and ends
    with "expected one argument", which does not say that the value was the problem.
    """
    takes_value, every = _value_options(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in takes_value and i + 1 < len(argv):
            value = argv[i + 1]
            if value.startswith("-") and value != "-" and value.split("=")[0] not in every:
                out.append(f"{token}={value}")
                i += 2
                continue
        out.append(token)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memfit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_attach_dash_values(parser, sys.argv[1:] if argv is None else argv))
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops with a checkpoint instead)
        print(f"memfit {args.command}: interrupted", file=sys.stderr)
        return 130
    return result
