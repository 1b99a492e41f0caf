"""The ``memfit`` command line.

``memfit demo`` is the main job (see the design of record); until the demo trainer lands it says
plainly what exists today and what is coming, and does not pretend to train anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from memfit import __version__

_DEMO_STATUS = """\
memfit {version}: the demo trainer is not built yet.

What works today:
  memfit.memory.track()   measured memory of a training step by category (parameters, gradients,
                          optimizer state, activations, temporaries, inputs) -- see README.md
  memfit.optim.SM3        SM3-I / SM3-II with sublinear optimizer state; CountSketchAdam baseline
  memfit.remat.solve()    rematerialization schedules for a computation graph under a byte budget
                          (noremat, sqrt(n) checkpointing, chain DP, TwRemat, MILP, budget)

What `memfit demo` will do (issue "The main job"): train a small GPT on the Python standard library's
own documentation with Adam, SM3, SM3 + remat and Adafactor, and print memory by category, step
time, tokens/s and loss side by side, with a plot.
"""


def _demo(_: argparse.Namespace) -> int:
    print(_DEMO_STATUS.format(version=__version__))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memfit", description="Train deep networks in less memory, and see what it costs in time."
    )
    parser.add_argument("--version", action="version", version=f"memfit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="the main job on an embedded default (not built yet: says what is coming)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
