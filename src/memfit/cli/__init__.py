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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memfit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops with a checkpoint instead)
        print(f"memfit {args.command}: interrupted", file=sys.stderr)
        return 130
    return result
