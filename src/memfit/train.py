"""``memfit train``: train a model with any memfit optimizer and remat budget, from options or a TOML file, with
atomic checkpoints and a bitwise-exact ``--resume``.

Resumption is exact on the CPU because everything a step depends on is either in the checkpoint (model,
optimizer, LR schedule, step, RNG states) or a pure function of it: the batch of step ``k`` is
``TextDataset.batch("train", k, ...)`` (:mod:`memfit.data`), so the data position is the step itself.

Checkpoints are written to a temporary file, flushed to disk, then renamed over the final name (a rename is
atomic on POSIX): a crash leaves either the old file or the new one, never half of one. On ``--resume`` a
checkpoint that does not load (truncated, foreign, another format) is reported by name and the previous one is
used; the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from memfit.data import TextDataset
from memfit.models import get_model
from memfit.optim import sm3_warmup_schedule
from memfit.plan import OPTIMIZERS, make_optimizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "TrainConfig", "load_config", "train"]

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """No checkpoint could be loaded (the message names each file tried and why it failed)."""


@dataclass(kw_only=True)
class TrainConfig:
    """What ``memfit train`` trains; every field is a TOML key and a ``--option``.

    Attributes:
        model: a GPT preset of :mod:`memfit.models`.
        data: text file (``None``: the default corpus).
        optimizer: one of :data:`memfit.plan.OPTIMIZERS`.
        lr: learning rate (``None``: the optimizer's usual default).
        optimizer_args: further keyword arguments of the optimizer (e.g. ``{momentum = 0.9}``).
        warmup_steps: the SM3 authors' quadratic learning-rate warm-up.
        remat_budget: ``None`` (no remat) or a fraction in (0, 1] for :func:`memfit.remat.compile`.
        batch_size: sequences per step.
        seq_len: bytes per sequence.
        steps: optimizer steps in all.
        seed: seed of the weights and the batches.
        out: output directory (metrics, plot, checkpoints, the resolved config).
        checkpoint_every: steps between checkpoints.
        keep: checkpoints kept.
        eval_every: steps between validation losses (0: only at the end).
        eval_batches: validation batches per evaluation.
    """

    model: str = "tiny"
    data: str | None = None
    optimizer: str = "sm3"
    lr: float | None = None
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 100
    remat_budget: float | None = None
    batch_size: int = 16
    seq_len: int = 64
    steps: int = 1000
    seed: int = 0
    out: str = "runs/train"
    checkpoint_every: int = 100
    keep: int = 2
    eval_every: int = 0
    eval_batches: int = 4

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("batch_size", "seq_len", "steps", "checkpoint_every", "keep", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.remat_budget is not None and not 0.0 < self.remat_budget <= 1.0:
            raise ValueError(f"remat_budget must be in (0, 1] or absent, got {self.remat_budget}")


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a TOML file into a :class:`TrainConfig`; ``overrides`` (not ``None``) win over the file.

    Raises:
        ValueError: an unknown key (the message lists the allowed ones) or a bad value.
    """
    data = tomllib.loads(Path(path).read_text())
    allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**data)


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*.pt"))


def _save(out: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    path = out / f"checkpoint-{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)  # atomic: readers see the old file or the whole new one
    for old in _checkpoints(out)[:-keep]:
        old.unlink()
    return path


def _load_latest(out: Path, say: Any) -> dict[str, Any]:
    tried: list[str] = []
    for path in reversed(_checkpoints(out)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a memfit checkpoint of format {CHECKPOINT_FORMAT}")
        except Exception as exc:  # a truncated zip, a foreign pickle, another format: all unusable
            tried.append(f"{path.name}: {type(exc).__name__}: {exc}")
            say(
                f"[yellow]checkpoint {path} is unusable ({type(exc).__name__}: {exc}); trying the previous one[/]"
            )
            continue
        return state
    raise CheckpointError(
        f"no usable checkpoint in {out}" + ("".join(f"\n  {t}" for t in tried) or " (none found)")
    )


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: Any = None, say: Any = print
) -> dict[str, Any]:
    """Train; returns ``{"losses": [...], "val": [...], "out": ...}``.

    A SIGTERM stops the run after the current step with a checkpoint (resume it with ``resume=True``).

    Raises:
        FloatingPointError: a non-finite loss (before the update is applied).
        CheckpointError: ``resume`` and no usable checkpoint.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(_to_toml(asdict(cfg)))
    spec = get_model(cfg.model)
    ds = TextDataset.from_file(cfg.data)
    torch.manual_seed(cfg.seed)
    model = spec.build()
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, **cfg.optimizer_args)
    sched = sm3_warmup_schedule(opt, warmup_steps=cfg.warmup_steps)
    losses: list[float] = []
    val: list[tuple[int, float]] = []
    start = 0
    if resume:
        state = _load_latest(out, say)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        start, losses, val = state["step"], list(state["losses"]), [tuple(v) for v in state["val"]]
        say(f"resumed from step {start}")
    step_fn: Any
    if cfg.remat_budget is not None:
        from memfit import remat

        example = ds.batch("train", 0, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        step_fn = remat.compile(model, spec.loss_fn, example, budget=cfg.remat_budget)  # type: ignore[operator]
    else:
        step_fn = None

    stop = {"signal": False}

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop["signal"] = True

    old_handler = signal.signal(signal.SIGTERM, on_term)

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "losses": losses,
            "val": val,
            "config": asdict(cfg),
        }

    metrics = out / "metrics.csv"
    rows = _read_rows(metrics, upto=start) if resume else []
    task = progress.add_task("training", total=cfg.steps, completed=start) if progress is not None else None
    try:
        with open(metrics, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss", "lr", "seconds"])
            writer.writerows(rows)
            for k in range(start, cfg.steps):
                batch = ds.batch("train", k, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
                t0 = time.perf_counter()
                if step_fn is None:
                    loss = spec.loss_fn(model, batch)
                    value = float(loss.detach())
                    if math.isfinite(value):
                        loss.backward()
                else:
                    value = float(step_fn(batch))
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the training loss is {value} at step {k} (lr {sched.get_last_lr()[0]:.3g}); the update "
                        f"was not applied. Lower the learning rate (lr={cfg.lr}) or resume from a checkpoint in {out}"
                    )
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                losses.append(value)
                writer.writerow([k + 1, repr(value), sched.get_last_lr()[0], time.perf_counter() - t0])
                f.flush()  # a reader (or a crash) sees every finished step
                if cfg.eval_every and (k + 1) % cfg.eval_every == 0:
                    val.append((k + 1, _evaluate(model, spec, ds, cfg)))
                if task is not None:
                    progress.update(task, advance=1, description=f"step {k + 1} loss {value:.3f}")
                done = k + 1 == cfg.steps
                if (k + 1) % cfg.checkpoint_every == 0 or done or stop["signal"]:
                    f.flush()
                    _save(out, snapshot(k + 1), k + 1, cfg.keep)
                if stop["signal"] and not done:
                    say(f"SIGTERM: stopped after step {k + 1} with a checkpoint; continue with --resume")
                    return {"losses": losses, "val": val, "out": str(out), "stopped": True}
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    if not val or val[-1][0] != cfg.steps:
        val.append((cfg.steps, _evaluate(model, spec, ds, cfg)))
    _plot(losses, val, out / "loss.png", cfg)
    return {"losses": losses, "val": val, "out": str(out), "stopped": False}


@torch.no_grad()
def _evaluate(model: torch.nn.Module, spec: Any, ds: TextDataset, cfg: TrainConfig) -> float:
    vals = [
        float(spec.loss_fn(model, ds.batch("val", i, cfg.batch_size, cfg.seq_len, seed=cfg.seed)))
        for i in range(cfg.eval_batches)
    ]
    return sum(vals) / len(vals)


def _read_rows(path: Path, *, upto: int) -> list[list[str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [r for r in rows if r and int(r[0]) <= upto]


def _to_toml(d: dict[str, Any]) -> str:
    lines = []
    tables = []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append(f"[{k}]\n" + "".join(f"{kk} = {_toml_value(vv)}\n" for kk, vv in v.items()))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n" + "".join(f"\n{t}" for t in tables)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _plot(losses: list[float], val: list[tuple[int, float]], path: Path, cfg: TrainConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o--", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(
        f"memfit train: {cfg.model}, {cfg.optimizer}"
        + (f", remat {cfg.remat_budget:.0%}" if cfg.remat_budget else "")
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
