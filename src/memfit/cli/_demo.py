"""``memfit demo``: the main job on the default corpus, no arguments needed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_DEFAULT_OUT = "runs/demo"


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="train a small GPT with Adam, SM3, SM3 + remat and Adafactor; compare memory, time and loss",
        description="Trains a small GPT on CPython's own documentation (no download) under Adam, SM3, "
        "SM3 + remat and Adafactor, and prints measured memory by category, step time, tokens/s and loss.",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="bytes per sequence (default 64)")
    p.add_argument("--data", default=None, help="a text file to train on (default: pydoc_data/topics.py)")
    p.add_argument("--model", default=None, help="a GPT preset (default mini)")
    p.add_argument("--out", default=_DEFAULT_OUT, help=f"output directory (default {_DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=None, help="seed of weights and batches (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _error(message: str) -> int:
    print(f"memfit demo: error: {message}", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line (what was given, what is allowed), or ``None``."""
    from memfit.data import TextDataset
    from memfit.demo import DemoConfig
    from memfit.models import PRESETS

    for name in ("steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if args.seed is not None and not 0 <= args.seed <= 9999:
        return f"--seed must be in [0, 9999], got {args.seed}"
    lm = [name for name, spec in PRESETS.items() if spec.kind == "lm"]
    model = args.model if args.model is not None else DemoConfig.model
    if model not in lm:
        return f"--model must be a GPT preset ({', '.join(lm)}), got {model!r}"
    block = PRESETS[model].gpt.block_size  # type: ignore[union-attr]
    if args.seq_len is not None and not 1 <= args.seq_len <= block:
        return f"--seq-len must be in [1, {block}] for {model} (its block size), got {args.seq_len}"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out must be a directory, but {out} is a file"
    if args.data is not None:
        data = Path(args.data)
        if not data.is_file():
            return f"--data must be a text file, but {data} " + (
                "is a directory" if data.is_dir() else "does not exist"
            )
        try:
            ds = TextDataset.from_file(data)
            for split in ("train", "val"):
                ds.batch(split, 0, 1, args.seq_len or DemoConfig.seq_len)
        except (ValueError, OSError) as exc:
            return f"--data {data}: {exc}"
    return None


def run(args: argparse.Namespace) -> int:
    from memfit.demo import DemoConfig, make_table, plot_report, run_demo, write_report
    from memfit.demo._run import _specs as demo_specs

    problem = _check(args)
    if problem is not None:
        return _error(problem)
    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "model": args.model,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "data": args.data,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    if "steps" in overrides:
        overrides["eval_every"] = max(1, overrides["steps"] // 5)
        overrides["warmup_steps"] = max(1, min(100, overrides["steps"] // 3))
    try:
        cfg = DemoConfig(**overrides)
    except (TypeError, ValueError) as exc:
        return _error(str(exc))
    console = Console()
    wide = Console(width=max(console.width, 150))  # the table has 12 columns
    runs = [
        spec.name for spec in demo_specs(cfg, None)
    ]  # the equal-memory run is planned once the demo starts
    equal = ", then SM3 + remat at the largest batch that fits Adam's memory" if cfg.equal_memory else ""
    console.print(
        f"[bold]memfit demo[/]: {cfg.model} GPT, {cfg.steps} steps x {len(runs)} configurations "
        f"({', '.join(runs)}){equal}, batches of {cfg.batch_size}x{cfg.seq_len} bytes"
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    from memfit.remat import InfeasibleBudget

    try:
        with Progress(*columns, console=console, disable=args.quiet, transient=False) as progress:
            report = run_demo(cfg, progress=progress)
        out = Path(args.out)
        json_path = write_report(report, out / "report.json")
        png_path = plot_report(report, out / "demo.png")
    except (FloatingPointError, InfeasibleBudget, OSError) as exc:  # OSError: a full disk, no permission, ...
        print(f"memfit demo: {exc}", file=sys.stderr)
        return 1
    wide.print(make_table(report))
    console.print(f"wrote [bold]{json_path}[/] and [bold]{png_path}[/]")
    return 0
