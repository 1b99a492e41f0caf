"""``memfit demo``: what SM3 and rematerialization save, what they cost, and what the saved memory buys.

Trains the same small GPT on the default byte-level corpus (CPython's ``pydoc_data`` topics) under several
configurations, interleaved step by step so that a noisy shared machine slows them all alike:

- at the demo's batch: Adam; SM3 without momentum (state sublinear in the parameters); SM3 with
  :func:`memfit.remat.compile` at half the no-remat step's memory beyond parameters and batch; Adafactor; SM3
  with momentum 0.9 in a bfloat16 buffer (+2 bytes per parameter, still a quarter of Adam's 8);
- at equal memory: under the peak the planner predicts for Adam at the demo's batch, the largest batch the planner
  predicts SM3 + remat fits (:func:`memfit.demo.plan_equal_memory`), trained on the same number of tokens.

For each: memory of one training step by category, measured with :func:`memfit.memory.track` (not computed from
data structure sizes); step time (median wall time of forward + backward + update); training loss and validation
loss against steps, tokens and training seconds.
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
from memfit.demo._equal import EqualMemoryPlan, plan_equal_memory
from memfit.demo._optim import build_optimizer
from memfit.memory import track
from memfit.models import ModelSpec, get_model
from memfit.optim import sm3_warmup_schedule

__all__ = ["DemoConfig", "RunResult", "machine_info", "run_demo"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo trains. The defaults finish in under a minute on an idle two-core CPU (43.6 s, 2026-12-02).

    The learning rates were chosen by ``benchmarks/demo_tuning.py`` (same 3-point grid size and 3 seeds for every
    optimizer, chosen on a tuning split carved from the training data; ``benchmarks/results/demo_tuning.json``).

    Attributes:
        model: a preset of :mod:`memfit.models` (a GPT).
        batch_size: sequences per step (every run but the equal-memory one).
        seq_len: bytes per sequence.
        steps: optimizer steps per configuration at ``batch_size``.
        warmup_steps: quadratic learning-rate warm-up (the SM3 authors' schedule), for every optimizer alike
            (the equal-memory run warms up over the same number of tokens).
        eval_every: validation loss every this many steps (and at the end).
        eval_batches: validation batches per evaluation (of ``batch_size`` sequences, for every run).
        seed: seed of the initial weights (shared by all configurations) and of the batches.
        adam_lr: Adam's learning rate.
        sm3_lr: SM3's learning rate (no momentum).
        sm3_momentum_lr: learning rate of SM3 with momentum 0.9 in bfloat16.
        adafactor_lr: Adafactor's learning rate (relative to each parameter's RMS, as ``torch.optim.Adafactor``).
        equal_memory_lr: learning rate of the equal-memory SM3 + remat run (tuned at its own batch).
        remat_budget: budget of the SM3 + remat runs: a fraction of the no-remat step's memory beyond
            parameters, buffers and batch (see :func:`memfit.remat.compile`); when the gradients alone exceed
            it (tiny batches), the smallest feasible budget is used and the run's name says which fraction.
        equal_memory: whether to plan and train the equal-memory run.
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
    sm3_lr: float = 0.02
    sm3_momentum_lr: float = 0.04
    adafactor_lr: float = 0.04
    equal_memory_lr: float = 0.005
    remat_budget: float = 0.5
    equal_memory: bool = True
    data: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "steps", "warmup_steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("adam_lr", "sm3_lr", "sm3_momentum_lr", "adafactor_lr", "equal_memory_lr"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"DemoConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.remat_budget <= 1.0:
            raise ValueError(f"DemoConfig.remat_budget must be in (0, 1], got {self.remat_budget}")


@dataclass(kw_only=True)
class RunResult:
    """What one configuration measured.

    Attributes:
        name: label in the table and plot.
        optimizer: optimizer class name.
        optimizer_kind: its key in :func:`memfit.demo.build_optimizer` (``"sm3-bf16"``: momentum 0.9 in bf16).
        lr: peak learning rate.
        remat_budget: the remat budget (fraction), or ``None`` without remat.
        batch_size: sequences per step.
        steps: optimizer steps taken.
        tokens: tokens trained on (``steps * batch_size * seq_len``).
        peak_bytes: measured peak of one training step (everything tracked: parameters included).
        breakdown: bytes by category at that peak (sums to ``peak_bytes``).
        optimizer_state_bytes: optimizer state at the peak.
        step_seconds: median step time.
        train_seconds: total wall time of the run's steps (evaluation excluded).
        tokens_per_second: ``batch_size * seq_len / step_seconds``.
        train_loss: mean training loss over the last 10% of steps.
        val_loss: validation loss at the end.
        losses: training loss of every step.
        val_curve: ``(step, validation loss)`` pairs.
        val_points: one dict per evaluation: ``step``, ``tokens``, ``seconds`` (training time so far), ``val_loss``.
        remat_plan: the remat plan as a dict (predicted peak, overhead), or ``None``.
        equal_memory: for the equal-memory run, the planner's choice (:class:`memfit.demo.EqualMemoryPlan` as a
            dict: ``limit_bytes``, ``batch_size``, ``predicted_peak_bytes``, ...), else ``None``.
        planned_peak_bytes: the planner's predicted peak of this run's step (equal-memory run), else ``None``.
    """

    name: str
    optimizer: str
    optimizer_kind: str = ""
    lr: float = math.nan
    remat_budget: float | None
    batch_size: int = 0
    steps: int = 0
    tokens: int = 0
    peak_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)
    optimizer_state_bytes: int = 0
    step_seconds: float = math.nan
    train_seconds: float = 0.0
    tokens_per_second: float = math.nan
    train_loss: float = math.nan
    val_loss: float = math.nan
    losses: list[float] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    val_points: list[dict[str, float]] = field(default_factory=list)
    remat_plan: dict[str, Any] | None = None
    equal_memory: dict[str, Any] | None = None
    planned_peak_bytes: int | None = None


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str
    lr: float
    remat: float | None
    batch_size: int
    steps: int
    warmup_steps: int


@dataclass
class _Run:
    spec: _Spec
    result: RunResult
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    step_fn: Callable[[Batch], torch.Tensor]
    times: list[float] = field(default_factory=list)


def _specs(cfg: DemoConfig, eq: EqualMemoryPlan | None) -> list[_Spec]:
    base = (cfg.batch_size, cfg.steps, cfg.warmup_steps)
    specs = [
        _Spec("Adam", "adam", cfg.adam_lr, None, *base),
        _Spec("SM3", "sm3", cfg.sm3_lr, None, *base),
        _Spec("SM3 + remat", "sm3", cfg.sm3_lr, cfg.remat_budget, *base),
        _Spec("Adafactor", "adafactor", cfg.adafactor_lr, None, *base),
        _Spec("SM3 + momentum (bf16)", "sm3-bf16", cfg.sm3_momentum_lr, None, *base),
    ]
    if eq is not None:
        ratio = cfg.batch_size / eq.batch_size  # the same tokens, and the warm-up over the same tokens
        specs.append(
            _Spec(
                f"SM3 + remat, batch {eq.batch_size} (equal memory)"
                if eq.remat_budget
                else f"SM3, batch {eq.batch_size} (equal memory)",
                "sm3",
                cfg.equal_memory_lr,
                eq.remat_budget,
                eq.batch_size,
                max(1, round(cfg.steps * ratio)),
                max(1, round(cfg.warmup_steps * ratio)),
            )
        )
    return specs


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _remat_step(model: nn.Module, model_spec: ModelSpec, example: Batch, budget: float) -> Any:
    from memfit import remat  # imports torch.fx machinery: only when the demo runs

    rstep = remat.compile(model, model_spec.loss_fn, example, budget=None)  # type: ignore[operator]  # capture once
    try:
        rstep = rstep.with_budget(budget)
        rstep.prepare(example)
    except remat.InfeasibleBudget as exc:
        # small batches: the gradients alone exceed the fraction; take the least memory that is feasible
        rstep = rstep.with_budget(int(exc.min_peak * 1.02) + 1)
        rstep.prepare(example)
    return rstep


def _build(cfg: DemoConfig, ds: TextDataset, specs: list[_Spec], eq: EqualMemoryPlan | None) -> list[_Run]:
    model_spec = get_model(cfg.model)
    runs: list[_Run] = []
    for s in specs:
        torch.manual_seed(cfg.seed)  # the same initial weights for every configuration
        model = model_spec.build()
        opt = build_optimizer(s.kind, model.parameters(), s.lr)
        sched = sm3_warmup_schedule(opt, warmup_steps=s.warmup_steps)
        result = RunResult(
            name=s.name,
            optimizer=type(opt).__name__,
            optimizer_kind=s.kind,
            lr=s.lr,
            remat_budget=s.remat,
            batch_size=s.batch_size,
        )
        step_fn: Callable[[Batch], torch.Tensor]
        if s.remat is None:

            def step_fn(batch: Batch, model: nn.Module = model) -> torch.Tensor:
                loss = model_spec.loss_fn(model, batch)
                loss.backward()
                return loss.detach()

        else:
            example = ds.batch("train", 0, s.batch_size, cfg.seq_len, seed=cfg.seed)
            rstep = _remat_step(model, model_spec, example, s.remat)
            plan = rstep.plan
            result.remat_plan = plan.to_dict()
            if s.batch_size == cfg.batch_size:
                result.name = f"SM3 + remat {plan.peak_bytes / plan.noremat_peak_bytes:.0%}"
            step_fn = rstep
        if s.batch_size != cfg.batch_size and eq is not None:
            result.equal_memory = eq.to_dict()
            result.planned_peak_bytes = eq.predicted_peak_bytes
        runs.append(_Run(s, result, model, opt, sched, step_fn))
    return runs


@torch.no_grad()
def _evaluate(run: _Run, ds: TextDataset, cfg: DemoConfig) -> float:
    spec = get_model(cfg.model)
    losses = [
        float(spec.loss_fn(run.model, ds.batch("val", i, cfg.batch_size, cfg.seq_len, seed=cfg.seed)))
        for i in range(cfg.eval_batches)
    ]
    return sum(losses) / len(losses)


def _train_step(run: _Run, batch: Batch) -> None:
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
    run.result.losses.append(value)


def _record_eval(run: _Run, ds: TextDataset, cfg: DemoConfig) -> None:
    r, k = run.result, len(run.times)
    loss = _evaluate(run, ds, cfg)
    r.val_curve.append((k, loss))
    r.val_points.append(
        {
            "step": k,
            "tokens": k * run.spec.batch_size * cfg.seq_len,
            "seconds": sum(run.times),
            "val_loss": loss,
        }
    )


def _measure_memory(run: _Run, batch: Batch) -> None:
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


def _train(runs: list[_Run], ds: TextDataset, cfg: DemoConfig, progress: Any) -> None:
    """Step every run, interleaved: the demo-batch runs in lockstep, a larger-batch run whenever it has seen no
    more tokens than they have after its next step."""
    lock = [r for r in runs if r.spec.batch_size == cfg.batch_size]
    other = [r for r in runs if r.spec.batch_size != cfg.batch_size]
    total = sum(r.spec.steps for r in runs)
    task = progress.add_task("training", total=total) if progress is not None else None

    def step(run: _Run, k: int, at: int) -> None:
        _train_step(run, ds.batch("train", k, run.spec.batch_size, cfg.seq_len, seed=cfg.seed))
        if progress is not None:
            progress.update(task, advance=1, description=f"training step {at + 1}/{cfg.steps}")

    for k_lock in range(cfg.steps):
        # rotate who goes first, so no configuration always runs right after the same other one
        order = lock[k_lock % len(lock) :] + lock[: k_lock % len(lock)]
        for run in order:
            step(run, k_lock, k_lock)
        seen = (k_lock + 1) * cfg.batch_size
        for run in other:
            while len(run.times) < run.spec.steps and (len(run.times) + 1) * run.spec.batch_size <= seen:
                step(run, len(run.times), k_lock)
        if (k_lock + 1) % cfg.eval_every == 0 or k_lock + 1 == cfg.steps:
            for run in runs:
                if not run.result.val_curve or run.result.val_curve[-1][0] != len(run.times):
                    _record_eval(run, ds, cfg)
    for run in other:  # a rounded-up step count: the last steps after the lockstep runs' end
        while len(run.times) < run.spec.steps:
            step(run, len(run.times), cfg.steps - 1)
        if run.result.val_curve[-1][0] != len(run.times):
            _record_eval(run, ds, cfg)


def run_demo(cfg: DemoConfig | None = None, *, progress: Any = None) -> dict[str, Any]:
    """Plan the equal-memory run, train every configuration interleaved, then measure one step of each.

    Args:
        cfg: what to train (default :class:`DemoConfig`).
        progress: a ``rich.progress.Progress`` to report to (``None``: silent).

    Returns:
        The report: ``{"config", "machine", "results": [RunResult as dict, ...], "ratios": {...},
        "equal_memory": {...} | None}``; ratios are to Adam's figures.

    Raises:
        FloatingPointError: a training loss became NaN or infinite (the message names the run and the step).
        memfit.remat.InfeasibleBudget: the remat budget is below what the step needs.
    """
    cfg = cfg or DemoConfig()
    ds = TextDataset.from_file(cfg.data)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    with _threads(cfg.threads):
        eq = None
        if cfg.equal_memory:
            ptask = (
                progress.add_task("planning the equal-memory batch", total=1)
                if progress is not None
                else None
            )
            eq = plan_equal_memory(cfg.model, cfg.batch_size, cfg.seq_len, remat_budget=cfg.remat_budget)
            if progress is not None:
                progress.update(
                    ptask, advance=1, description=f"planned: batch {eq.batch_size} at equal memory"
                )
        runs = _build(cfg, ds, _specs(cfg, eq), eq)
        _train(runs, ds, cfg, progress)
        mtask = progress.add_task("measuring memory", total=len(runs)) if progress is not None else None
        for run in runs:
            _measure_memory(
                run, ds.batch("train", cfg.steps, run.spec.batch_size, cfg.seq_len, seed=cfg.seed)
            )
            if progress is not None:
                progress.update(mtask, advance=1)
    for run in runs:
        r = run.result
        r.steps = len(run.times)
        r.tokens = r.steps * r.batch_size * cfg.seq_len
        r.train_seconds = sum(run.times)
        skip = min(len(run.times) - 1, max(1, len(run.times) // 10))  # the first steps warm caches up
        r.step_seconds = statistics.median(run.times[skip:])
        r.tokens_per_second = r.batch_size * cfg.seq_len / r.step_seconds
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
            "tokens_per_second": r.result.tokens_per_second / base.tokens_per_second,
            "val_loss": r.result.val_loss / base.val_loss,
        }
        for r in runs
    }
    return {
        "format": 2,
        "config": asdict(cfg),
        "machine": machine_info(),
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "n_params": sum(p.numel() for p in runs[0].model.parameters()),
        "results": [asdict(r.result) for r in runs],
        "ratios": ratios,
        "equal_memory": None
        if eq is None
        else {**eq.to_dict(), "adam_measured_peak_bytes": base.peak_bytes, "name": runs[-1].result.name},
        "wall_seconds": time.perf_counter() - t_wall,
        "process_cpu_seconds": time.process_time() - t_cpu,
    }
