"""``memfit plan``: what fits in N GiB, with which optimizer and remat budget — predicted before you start.

memfit plan --model gpt2-xl --batch 8x1024 --memory 24GiB
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

_BATCH = re.compile(r"\s*(\d+)\s*(?:x\s*(\d+))?\s*")


def parse_batch(text: str) -> tuple[int, int | None]:
    """``"8x1024"`` -> ``(8, 1024)``; ``"8"`` -> ``(8, None)`` (the preset's sequence length).

    Raises:
        argparse.ArgumentTypeError: a malformed batch.
    """
    m = _BATCH.fullmatch(text)
    if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a batch: use BATCHxSEQ (e.g. 8x1024) or BATCH"
        )
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


def _budget(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a remat budget is 'none' or a fraction in (0, 1], got {text!r}"
        ) from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a remat budget must be in (0, 1], got {value}")
    return value


def add_parser(sub: Any) -> None:
    from memfit.plan import OPTIMIZERS

    p: argparse.ArgumentParser = sub.add_parser(
        "plan",
        help="predict peak memory by category and remat overhead per optimizer, without allocating the model",
        description="Predicts, without allocating the model (meta tensors), the peak memory of one training step "
        "by category for each optimizer and remat budget, whether it fits a limit and the largest batch that does.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a preset (tiny, small, medium, gpt2 ... gpt2-xl, cnn) or package.module:factory",
    )
    p.add_argument("--batch", required=True, type=parse_batch, help="BATCHxSEQ, e.g. 8x1024 (or BATCH)")
    p.add_argument("--memory", default=None, help="the limit, e.g. 24GiB, 80GB")
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated (default: {','.join(OPTIMIZERS)})",
    )
    p.add_argument(
        "--remat",
        default="none,0.5,0.25",
        help="comma-separated budgets: none and fractions (default none,0.5,0.25)",
    )
    p.add_argument(
        "--input-shape", default=None, help="per-example input shape of an import-path model, e.g. 3x32x32"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memfit.models import get_model
    from memfit.plan import estimate

    batch_size, seq_len = args.batch
    shape = tuple(int(s) for s in args.input_shape.split("x")) if args.input_shape else ()
    try:
        spec = get_model(args.model, input_shape=shape)
        budgets = [_budget(t) for t in args.remat.split(",") if t.strip()]
        optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
        err = Console(stderr=True)
        quiet = args.json or not sys.stderr.isatty()
        with err.status("planning", spinner="dots") if not quiet else _Null() as status:

            def say(msg: str) -> None:
                if status is not None:
                    status.update(msg)

            est = estimate(
                spec,
                batch_size,
                seq_len,
                memory=args.memory,
                optimizers=optimizers,
                remat=budgets,
                progress=say,
            )
    except (ValueError, argparse.ArgumentTypeError, ImportError, AttributeError) as exc:
        print(f"memfit plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    console = Console(width=max(Console().width, 140))
    console.print(est.table())
    for note in est.notes:
        console.print(f"note: {note}")
    best = est.best()
    if est.memory is not None:
        if best is None:
            console.print("[red]nothing fits[/]: lower the batch, or raise the limit")
        else:
            remat = "no remat" if best.remat is None else f"remat at {best.remat:.0%}"
            console.print(
                f"fastest that fits: [bold]{best.optimizer}, {remat}[/] ({best.step_overhead:.2f}x compute)"
            )
    console.print(f"planned in {est.seconds:.1f} s")
    return 0


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
