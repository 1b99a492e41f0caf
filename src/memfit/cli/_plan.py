"""``memfit plan``: what fits in N GiB, with which optimizer, precision and remat budget — predicted before you
start, for a preset, your own model, or a Hugging Face config.

memfit plan --model gpt2-xl --batch 8x1024 --memory 24GiB
memfit plan --model mypkg.models:make_model --loss mypkg.train:loss_fn --batch mypkg.train:make_batch --batch-size 32
memfit plan --model hf:llama --batch 4x2048 --memory 80GiB --precision bf16-autocast
memfit plan --model gpt2 --batch 8x1024 --memory 24GiB --step-in-backward   # also with the step in the backward
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
            f"cannot read {text!r} as a batch: use BATCHxSEQ (e.g. 8x1024), BATCH, or package.module:make_batch"
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
    from memfit.plan import DEFAULT_OPTIMIZERS, PRECISIONS

    p: argparse.ArgumentParser = sub.add_parser(
        "plan",
        help="predict peak memory by category, step time and remat overhead per optimizer, without allocating",
        description="Predicts, without allocating the model (fake tensors), the peak memory of one training step "
        "by category and its time for each optimizer and remat budget, whether it fits a limit and the largest "
        "batch that does.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a preset (tiny, small, medium, gpt2 ... gpt2-xl, cnn), package.module:factory (with --loss and a "
        "make_batch --batch), or hf:<model_type> / hf:path/to/config.json (a transformers config, no download)",
    )
    p.add_argument(
        "--batch",
        required=True,
        help="BATCHxSEQ (e.g. 8x1024) or BATCH for presets and hf: models; package.module:make_batch (a function "
        "returning an example batch) for a factory",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="scale a make_batch example to this batch size"
    )
    p.add_argument("--loss", default=None, help="package.module:fn, fn(model, batch) -> scalar loss")
    p.add_argument("--memory", default=None, help="the limit, e.g. 24GiB, 80GB")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument(
        "--device",
        default=None,
        help="the device planned for (default cpu; cuda needs a CUDA build of torch, not a GPU)",
    )
    p.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated (default: {','.join(DEFAULT_OPTIMIZERS)})",
    )
    p.add_argument(
        "--remat",
        default="none,0.5,0.25",
        help="comma-separated budgets: none and fractions (default none,0.5,0.25)",
    )
    p.add_argument(
        "--input-shape",
        default=None,
        help="per-example input shape of a classifier factory without --loss, e.g. 3x32x32 (cross-entropy loss)",
    )
    p.add_argument(
        "--step-in-backward",
        action="store_true",
        help="also plan each row with the optimizer step inside the backward (memfit.optim.step_in_backward: "
        "each gradient freed right after its update), next to the ordinary step",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _workload_args(args: argparse.Namespace) -> tuple[Any, Any, Any, int | None]:
    """``(model, loss_fn, batch, batch_size)`` for :func:`memfit.plan.estimate` from the command line.

    Raises:
        PlanInputError, ValueError, argparse.ArgumentTypeError: the line's own message.
    """
    from memfit.models import PRESETS, get_model
    from memfit.plan import PlanInputError, from_hf, from_module, import_object

    model: str = args.model
    if model.startswith("hf:"):
        batch_size, seq_len = parse_batch(args.batch)
        return from_hf(model[3:], batch_size, seq_len), None, None, None
    if model in PRESETS or ":" not in model:
        batch_size, seq_len = parse_batch(args.batch)
        return get_model(model), batch_size, seq_len, None
    if args.loss is None:
        if args.input_shape is None or ":" in args.batch:
            raise PlanInputError(
                f"--model {model}: a model of your own needs --loss package.module:fn and --batch "
                "package.module:make_batch (or, for a classifier, --batch N --input-shape CxHxW)"
            )
        batch_size, seq_len = parse_batch(args.batch)
        shape = tuple(int(s) for s in args.input_shape.split("x"))
        return get_model(model, input_shape=shape), batch_size, seq_len, None
    if ":" not in args.batch:
        raise PlanInputError(
            f"--batch {args.batch}: with --loss, --batch is package.module:make_batch (a function returning an "
            "example batch); scale it with --batch-size"
        )
    factory = import_object(model, "--model")
    if not callable(factory):
        raise PlanInputError(f"--model {model}: not callable (it must return an nn.Module)")
    loss_fn = import_object(args.loss, "--loss")
    if not callable(loss_fn):
        raise PlanInputError(f"--loss {args.loss}: not callable (it must be fn(model, batch) -> scalar)")
    make_batch = import_object(args.batch, "--batch")
    if not callable(make_batch):
        raise PlanInputError(f"--batch {args.batch}: not callable (it must return an example batch)")
    try:
        batch = make_batch()
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PlanInputError(f"--batch {args.batch} raised {type(exc).__name__}: {line}") from exc
    return from_module(factory, loss_fn, batch, name=model, batch_size=args.batch_size), None, None, None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from memfit.plan import estimate

    try:
        model, loss_fn, batch, batch_size = _workload_args(args)
        budgets = [_budget(t) for t in args.remat.split(",") if t.strip()]
        optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
        err = Console(stderr=True)
        quiet = args.json or not sys.stderr.isatty()
        with err.status("planning", spinner="dots") if not quiet else _Null() as status:

            def say(msg: str) -> None:
                if status is not None:
                    status.update(msg)

            est = estimate(
                model,
                loss_fn,
                batch,
                memory=args.memory,
                optimizers=optimizers,
                remat=budgets,
                precision=args.precision,
                batch_size=batch_size,
                device=args.device,
                progress=say,
                step_in_backward=args.step_in_backward,
            )
    except (ValueError, argparse.ArgumentTypeError, ImportError, AttributeError, RuntimeError) as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"memfit plan: {line}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. memfit.remat.UnsupportedGraph: one line, never a traceback
        line = (str(exc).strip().splitlines() or [""])[0]
        print(f"memfit plan: {type(exc).__name__}: {line}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    console = Console(width=max(Console().width, 160))
    console.print(est.table())
    for note in est.notes:
        console.print(f"note: {note}")
    best = est.best()
    if est.memory is not None:
        if best is None:
            console.print("[red]nothing fits[/]: lower the batch, or raise the limit")
        else:
            remat = "no remat" if best.remat is None else f"remat at {best.remat:.0%}"
            if not best.grads_resident:
                remat += ", step in backward"
            time = f", {best.step_seconds:.3g} s per step" if best.step_seconds is not None else ""
            console.print(
                f"fastest that fits: [bold]{best.optimizer}, {remat}[/] ({best.settings}; "
                f"{best.step_overhead:.2f}x compute{time})"
            )
    console.print(f"planned in {est.seconds:.1f} s")
    return 0


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
