"""``memfit demo``: what SM3 and rematerialization buy end to end, on a real task with no download.

Trains the same small GPT on the default byte-level corpus (CPython's ``pydoc_data`` topics) under several
configurations — Adam; SM3 (no momentum: sublinear state); SM3 with :func:`memfit.remat.compile` at half the
no-remat step's memory beyond parameters and batch; Adafactor — and compares them:

- memory of one training step by category, measured with :func:`memfit.memory.track` (not computed from data
  structure sizes);
- step time: median over the run of the wall time of forward + backward + update, with the configurations
  interleaved step by step so that a noisy shared machine slows them all alike;
- final training loss (mean over the last 10% of steps) and validation loss.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from memfit import __version__
from memfit.data import TextDataset
from memfit.memory import track
from memfit.models import get_model
from memfit.optim import SM3, sm3_warmup_schedule

__all__ = ["DemoConfig", "RunResult", "run_demo"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo trains. The defaults finish in about two minutes on two CPU cores.

    Attributes:
        model: a preset of :mod:`memfit.models` (a GPT).
        batch_size: sequences per step.
        seq_len: bytes per sequence.
        steps: optimizer steps per configuration.
        warmup_steps: quadratic learning-rate warm-up (the SM3 authors' schedule), for every optimizer alike.
        eval_every: validation loss every this many steps (and at the end).
        eval_batches: validation batches per evaluation.
        seed: seed of the initial weights (shared by all configurations) and of the batches.
        adam_lr: Adam's learning rate, tuned on this demo like SM3's (best of 6e-4..5e-3 over 3 seeds).
        sm3_lr: SM3's learning rate. Tuned on this demo (3 seeds, 2026-11-22): larger ones (0.02 and up) blow up
            in the warm-up, and SM3's accumulators (sums, beta2 = 1) then keep the spike's gradients for good.
        adafactor_lr: Adafactor's learning rate.
        remat_budget: budget of the SM3 + remat run: a fraction of the no-remat step's memory beyond
            parameters, buffers and batch (see :func:`memfit.remat.compile`); when the gradients alone exceed
            it (tiny batches), the smallest feasible budget is used and the run's name says which fraction.
        data: text file to train on (``None``: the default corpus).
        threads: torch intra-op threads (``None``: leave torch's default).
    """

    model: str = "mini"
    batch_size: int = 8
    seq_len: int = 64
    steps: int = 300
    warmup_steps: int = 100
    eval_every: int = 60
    eval_batches: int = 4
    seed: int = 0
    adam_lr: float = 2e-3
    sm3_lr: float = 0.01
    adafactor_lr: float = 1e-2
    remat_budget: float = 0.5
    data: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.remat_budget <= 1.0:
            raise ValueError(f"DemoConfig.remat_budget must be in (0, 1], got {self.remat_budget}")


@dataclass(kw_only=True)
class RunResult:
    """What one configuration measured.

    Attributes:
        name: label in the table and plot.
        optimizer: optimizer class name.
        remat_budget: the remat budget (fraction), or ``None`` without remat.
        peak_bytes: measured peak of one training step (everything tracked: parameters included).
        breakdown: bytes by category at that peak (sums to ``peak_bytes``).
        optimizer_state_bytes: optimizer state at the peak.
        step_seconds: median step time.
        tokens_per_second: ``batch_size * seq_len / step_seconds``.
        train_loss: mean training loss over the last 10% of steps.
        val_loss: validation loss at the end.
        losses: training loss of every step.
        val_curve: ``(step, validation loss)`` pairs.
        remat_plan: the remat plan as a dict (predicted peak, overhead), or ``None``.
    """

    name: str
    optimizer: str
    remat_budget: float | None
    peak_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)
    optimizer_state_bytes: int = 0
    step_seconds: float = math.nan
    tokens_per_second: float = math.nan
    train_loss: float = math.nan
    val_loss: float = math.nan
    losses: list[float] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    remat_plan: dict[str, Any] | None = None


@dataclass
class _Run:
    result: RunResult
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    step_fn: Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    times: list[float] = field(default_factory=list)


def _configurations(
    cfg: DemoConfig,
) -> list[tuple[str, Callable[[nn.Module], torch.optim.Optimizer], float | None]]:
    return [
        ("Adam", lambda m: torch.optim.Adam(m.parameters(), lr=cfg.adam_lr), None),
        ("SM3", lambda m: SM3(m.parameters(), lr=cfg.sm3_lr, momentum=0.0), None),
        ("SM3 + remat", lambda m: SM3(m.parameters(), lr=cfg.sm3_lr, momentum=0.0), cfg.remat_budget),
        ("Adafactor", lambda m: torch.optim.Adafactor(m.parameters(), lr=cfg.adafactor_lr), None),
    ]


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build(cfg: DemoConfig, ds: TextDataset) -> list[_Run]:
    from memfit import remat  # imports torch.fx machinery: only when the demo runs

    spec = get_model(cfg.model)
    runs: list[_Run] = []
    example = ds.batch("train", 0, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    for name, make_opt, budget in _configurations(cfg):
        torch.manual_seed(cfg.seed)  # the same initial weights for every configuration
        model = spec.build()
        opt = make_opt(model)
        sched = sm3_warmup_schedule(opt, warmup_steps=cfg.warmup_steps)
        result = RunResult(name=name, optimizer=type(opt).__name__, remat_budget=budget)
        step_fn: Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
        if budget is None:

            def step_fn(batch: tuple[torch.Tensor, torch.Tensor], model: nn.Module = model) -> torch.Tensor:
                loss = spec.loss_fn(model, batch)
                loss.backward()
                return loss.detach()

        else:
            rstep = remat.compile(model, spec.loss_fn, example, budget=None)  # type: ignore[operator]  # capture once
            try:
                rstep = rstep.with_budget(budget)
                rstep.prepare(example)
            except remat.InfeasibleBudget as exc:
                # small batches: the gradients alone exceed the fraction; take the least memory that is feasible
                rstep = rstep.with_budget(int(exc.min_peak * 1.02) + 1)
                rstep.prepare(example)
            plan = rstep.plan
            result.remat_plan = plan.to_dict()
            result.name = f"SM3 + remat {plan.peak_bytes / plan.noremat_peak_bytes:.0%}"
            step_fn = rstep
        runs.append(_Run(result, model, opt, sched, step_fn))
    return runs


@torch.no_grad()
def _evaluate(run: _Run, ds: TextDataset, cfg: DemoConfig) -> float:
    spec = get_model(cfg.model)
    losses = [
        float(spec.loss_fn(run.model, ds.batch("val", i, cfg.batch_size, cfg.seq_len, seed=cfg.seed)))
        for i in range(cfg.eval_batches)
    ]
    return sum(losses) / len(losses)


def _train_step(run: _Run, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    loss = run.step_fn(batch)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.times.append(time.perf_counter() - t0)
    run.schedule.step()
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{run.result.name}: the training loss became {value} at step {len(run.times)}"
        )
    return value


def _measure_memory(run: _Run, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    with track(run.model, run.optimizer, inputs=batch) as t:
        run.step_fn(batch)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    rep = t.report
    run.result.peak_bytes = rep.total_peak_bytes
    run.result.breakdown = dict(rep.peak_breakdown)
    run.result.optimizer_state_bytes = rep.peak_breakdown["optimizer_state"]


def machine_info() -> dict[str, Any]:
    """Where a measurement was taken: date, platform, CPU count, torch and memfit versions."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memfit": __version__,
        "python": platform.python_version(),
    }


def run_demo(cfg: DemoConfig | None = None, *, progress: Any = None) -> dict[str, Any]:
    """Train every configuration, interleaved step by step, then measure one step of each under ``track``.

    Args:
        cfg: what to train (default :class:`DemoConfig`).
        progress: a ``rich.progress.Progress`` to report to (``None``: silent).

    Returns:
        The report: ``{"config", "machine", "results": [RunResult as dict, ...], "ratios": {...}}``; ratios are
        to Adam's figures.

    Raises:
        FloatingPointError: a training loss became NaN or infinite (the message names the run and the step).
        memfit.remat.InfeasibleBudget: the remat budget is below what the step needs.
    """
    cfg = cfg or DemoConfig()
    ds = TextDataset.from_file(cfg.data)
    with _threads(cfg.threads):
        runs = _build(cfg, ds)
        total = cfg.steps * len(runs)
        task = progress.add_task("training", total=total) if progress is not None else None
        for k in range(cfg.steps):
            batch = ds.batch("train", k, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
            # rotate who goes first, so no configuration always runs right after the same other one
            order = runs[k % len(runs) :] + runs[: k % len(runs)]
            for run in order:
                run.result.losses.append(_train_step(run, batch))
                if progress is not None:
                    progress.update(task, advance=1, description=f"training step {k + 1}/{cfg.steps}")
            if (k + 1) % cfg.eval_every == 0 or k + 1 == cfg.steps:
                for run in runs:
                    run.result.val_curve.append((k + 1, _evaluate(run, ds, cfg)))
        mtask = progress.add_task("measuring memory", total=len(runs)) if progress is not None else None
        last = ds.batch("train", cfg.steps, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        for run in runs:
            _measure_memory(run, last)
            if progress is not None:
                progress.update(mtask, advance=1)
    tokens = cfg.batch_size * cfg.seq_len
    for run in runs:
        r = run.result
        skip = min(len(run.times) - 1, max(1, len(run.times) // 10))  # the first steps warm caches up
        r.step_seconds = statistics.median(run.times[skip:])
        r.tokens_per_second = tokens / r.step_seconds
        tail = r.losses[-max(1, len(r.losses) // 10) :]
        r.train_loss = sum(tail) / len(tail)
        r.val_loss = r.val_curve[-1][1]
    base = runs[0].result
    ratios = {
        r.result.name: {
            "peak": r.result.peak_bytes / base.peak_bytes,
            "optimizer_state": r.result.optimizer_state_bytes / base.optimizer_state_bytes
            if base.optimizer_state_bytes
            else math.nan,
            "step_time": r.result.step_seconds / base.step_seconds,
            "val_loss": r.result.val_loss / base.val_loss,
        }
        for r in runs
    }
    return {
        "format": 1,
        "config": asdict(cfg),
        "machine": machine_info(),
        "tokens_per_step": tokens,
        "n_params": sum(p.numel() for p in runs[0].model.parameters()),
        "results": [asdict(r.result) for r in runs],
        "ratios": ratios,
    }
