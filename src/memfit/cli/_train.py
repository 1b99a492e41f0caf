"""``memfit train``: options or a TOML config (``--config``); ``--resume`` continues from the last checkpoint.

Exit status: 0 done; 2 bad input (one line on stderr says what and what is allowed); 1 the run failed (a
non-finite loss, no usable checkpoint); 128 + the signal's number when SIGTERM (143) or Ctrl-C (130) stopped it
with a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    from memfit.plan import OPTIMIZERS
    from memfit.train import LM_PRESETS, TrainConfig, default_lr

    d = TrainConfig.__dataclass_fields__  # defaults shown in --help come from the one place they are set

    def default(name: str) -> Any:
        f = d[name]
        return f.default

    p: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="train a GPT preset with any memfit optimizer and remat budget; checkpoints; --resume",
        description="Train a GPT preset on bytes of text with options or a TOML file (--config; options given "
        "here win; see docs/train.md and examples/train.toml). OUT gets config.toml (the options used), "
        "metrics.csv, loss.png and checkpoints. SIGTERM or Ctrl-C stops after the current step with a "
        "checkpoint; --resume continues it bit for bit.",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a TOML file of the options below (keys "
        "written with _, e.g. batch_size = 16); unknown keys are errors",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last usable checkpoint in --out; options left out are taken from OUT/config.toml, "
        "and only --steps, --checkpoint-every, --keep, --eval-every, --eval-batches may differ from it",
    )
    p.add_argument(
        "--model", default=None, help=f"a GPT preset: {', '.join(LM_PRESETS)} (default {default('model')})"
    )
    p.add_argument(
        "--data", default=None, metavar="FILE", help="a text file (default: CPython's pydoc_data/topics.py)"
    )
    p.add_argument(
        "--optimizer",
        default=None,
        choices=list(OPTIMIZERS),
        help=f"the optimizer (default {default('optimizer')}): "
        + "; ".join(f"{k}: {v}" for k, v in OPTIMIZERS.items()),
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        metavar="X",
        help="peak learning rate, >= 0 (default by optimizer: "
        + ", ".join(f"{k} {default_lr(k):g}" for k in OPTIMIZERS)
        + ")",
    )
    p.add_argument(
        "--optimizer-args",
        default=None,
        metavar="JSON",
        help="further optimizer arguments as a JSON object, e.g. '{\"momentum\": 0.9}' (default none)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"quadratic learning-rate warm-up, steps; 0: none (default {default('warmup_steps')})",
    )
    p.add_argument(
        "--remat-budget",
        type=float,
        default=None,
        metavar="X",
        help="recompute activations to fit this fraction in (0, 1] of the step's memory beyond parameters, "
        "buffers and batch (default: no remat)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help=f"sequences per step (default {default('batch_size')})",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="N",
        help=f"bytes per sequence, at most the model's block size (default {default('seq_len')})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help=f"optimizer steps in all (default {default('steps')})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help=f"seed of weights and batches, 0-9999 (default {default('seed')})",
    )
    p.add_argument("--out", default=None, metavar="DIR", help=f"output directory (default {default('out')})")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help=f"steps between checkpoints (default {default('checkpoint_every')})",
    )
    p.add_argument(
        "--keep", type=int, default=None, metavar="N", help=f"checkpoints kept (default {default('keep')})"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        metavar="N",
        help=f"steps between validation losses; 0: only at the end (default {default('eval_every')})",
    )
    p.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        metavar="N",
        help=f"validation batches per evaluation (default {default('eval_batches')})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _error(message: str) -> int:
    print(f"memfit train: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from memfit.train import CheckpointError, ConfigError, TrainConfig, load_config, train

    names = set(TrainConfig.__dataclass_fields__)
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "optimizer_args" in overrides:
        try:
            overrides["optimizer_args"] = json.loads(overrides["optimizer_args"])
        except json.JSONDecodeError as exc:
            return _error(
                f"--optimizer-args is not JSON ({exc.msg}, column {exc.colno}): give an object, "
                "e.g. '{\"momentum\": 0.9}'"
            )
        if not isinstance(overrides["optimizer_args"], dict):
            return _error(
                f"--optimizer-args must be a JSON object, e.g. '{{\"momentum\": 0.9}}', got {args.optimizer_args}"
            )

    class _LazyProgress(Progress):
        """Shown from the first task on: an error found before training prints its one line and nothing else."""

        shown = False

        def add_task(self, *a: Any, **kw: Any) -> Any:
            self.shown = True
            self.start()
            return super().add_task(*a, **kw)

        def stop(self) -> None:
            if self.shown:  # Progress.stop() prints a blank line on a non-terminal, started or not
                super().stop()

    console = Console(stderr=True)
    progress = _LazyProgress(console=console, disable=args.quiet)
    try:
        cfg = load_config(args.config, resume=args.resume, **overrides)
        try:
            result = train(cfg, resume=args.resume, progress=progress, say=console.print)
        finally:
            progress.stop()
    except ConfigError as exc:
        return _error(str(exc))
    except (FloatingPointError, CheckpointError, OSError) as exc:  # OSError: a full disk, no permission, ...
        print(f"memfit train: {exc}", file=sys.stderr)
        return 1
    if result["stopped"]:
        return 128 + int(result["signal"])
    console.print(f"done: final loss {result['losses'][-1]:.4f}; outputs in {result['out']}")
    return 0
