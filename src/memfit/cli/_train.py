"""``memfit train``: options or a TOML config (``--config``); ``--resume`` continues from the last checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any


def add_parser(sub: Any) -> None:
    from memfit.plan import OPTIMIZERS

    p: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="train a GPT preset with any memfit optimizer and remat budget; checkpoints; --resume",
        description="Train with options or a TOML file (--config; options given here win). The resolved config is "
        "saved as OUT/config.toml; metrics go to OUT/metrics.csv, the plot to OUT/loss.png.",
    )
    p.add_argument(
        "--config", default=None, help="a TOML file with TrainConfig keys (unknown keys are errors)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the last usable checkpoint in --out")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer-args", default=None, help="JSON, e.g. '{\"momentum\": 0.9}'")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--remat-budget", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from memfit.train import CheckpointError, TrainConfig, load_config, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if isinstance(overrides.get("optimizer_args"), str):
        overrides["optimizer_args"] = json.loads(overrides["optimizer_args"])
    console = Console(stderr=True)
    try:
        cfg = load_config(args.config, **overrides) if args.config else TrainConfig(**overrides)
        with Progress(console=console, disable=args.quiet) as progress:
            result = train(cfg, resume=args.resume, progress=progress, say=console.print)
    except (ValueError, FloatingPointError, CheckpointError, FileNotFoundError) as exc:
        console.print(f"memfit train: {exc}")
        return 1
    if result["stopped"]:
        return 143
    console.print(f"done: final loss {result['losses'][-1]:.4f}; outputs in {result['out']}")
    return 0
