"""``memfit.plan``: will this model train in N GiB, and with which optimizer and remat budget? Answered before
anything is allocated.

For a model, a batch shape and a memory limit, :func:`estimate` predicts, for each optimizer and remat setting,
the peak memory of one training step by category, the predicted compute overhead of recomputation, whether it
fits, and the largest batch that fits. Nothing real is allocated: the model is built on the ``meta`` device.

How each figure is obtained:

- **no remat**: the step's forward and backward run eagerly on ``meta`` tensors under
  :func:`memfit.memory.track` — the same ops, in the same order, as on a real device, with no data — so the
  prediction is the measurement of a step that allocates nothing.
- **optimizer state and update**: one ``optimizer.step()`` on ``meta`` tensors creates the state (its bytes are
  read off the state tensors), a second runs under ``track`` (the update's temporaries). Optimizers that read a
  value in ``step()`` (``.item()``: Adafactor, count-sketch) cannot step on ``meta``; their state comes from
  the formula in their docstring and the update's temporaries are taken as one copy of the largest parameter.
- **remat**: :func:`memfit.remat.capture` traces the step with fake tensors, :func:`memfit.remat.solve` schedules
  it under ``budget * (no-remat peak beyond inputs)``; the schedule's simulated peak and cost give the peak and
  the compute overhead.
- **largest batch**: memory beyond parameters, gradients and optimizer state grows linearly with the batch; the
  slope is everything at the no-remat peak but parameters and gradients, per example; a remat setting scales it
  by its budget.
- **deep presets** (GPTs of more than :data:`_REMAT_LAYERS` blocks): tracing a 48-block step takes minutes, so the
  remat schedule is solved on a slice of the model with :data:`_REMAT_LAYERS` blocks (same width, batch and
  sequence). Its compute overhead is taken as the full model's, and the remat peak as ``budget * (no-remat peak
  beyond inputs)`` of the full model (what a solver that meets its budget reaches); rows say so in ``note``.

The step's peak is the larger of the forward/backward peak (with the optimizer state resident) and the update's
peak (parameters, gradients, state, temporaries).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from memfit.memory import MemoryReport, format_bytes, track
from memfit.models import GPT, ModelSpec, get_model
from memfit.optim import SM3, CountSketchAdam

__all__ = ["OPTIMIZERS", "Estimate", "PlanRow", "estimate", "make_optimizer", "parse_bytes"]

_REMAT_LAYERS = 4  # blocks of the slice a deep GPT's remat schedule is solved on

OPTIMIZERS: dict[str, str] = {
    "adam": "torch.optim.Adam",
    "adagrad": "torch.optim.Adagrad",
    "adafactor": "torch.optim.Adafactor",
    "sm3": "memfit.optim.SM3 (no momentum)",
    "sm3-bf16": "memfit.optim.SM3, momentum 0.9 in bfloat16",
    "countsketch": "memfit.optim.CountSketchAdam",
}


def make_optimizer(name: str, params: Any, lr: float | None = None, **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer by its name in :data:`OPTIMIZERS` (``lr``: its usual default when ``None``).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr, **kwargs)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=1e-2 if lr is None else lr, **kwargs)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2 if lr is None else lr, **kwargs)
    if name == "sm3":
        return SM3(params, lr=0.1 if lr is None else lr, **{"momentum": 0.0, **kwargs})
    if name == "sm3-bf16":
        return SM3(
            params,
            lr=0.1 if lr is None else lr,
            **{"momentum": 0.9, "momentum_dtype": torch.bfloat16, **kwargs},
        )
    if name == "countsketch":
        return CountSketchAdam(params, lr=1e-3 if lr is None else lr, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20}
_UNITS.update({"g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40})


def parse_bytes(text: str | int) -> int:
    """``"24GiB"`` -> bytes. Binary (KiB, MiB, GiB, TiB; also K, M, G, T) and decimal (KB, MB, GB, TB) units.

    Raises:
        ValueError: a malformed or non-positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a size: use e.g. 24GiB, 512MiB, 80GB or a byte count")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    """The prediction for one (optimizer, remat setting).

    Attributes:
        optimizer: a key of :data:`OPTIMIZERS`.
        remat: the remat budget as a fraction of the no-remat step's memory beyond inputs; ``None``: no remat.
        peak_bytes: predicted peak of one training step.
        breakdown: bytes by category at that peak: ``parameters`` (incl. buffers), ``gradients``,
            ``optimizer_state``, ``activations`` (incl. temporaries), ``inputs`` (the batch).
        step_overhead: predicted compute of forward + backward relative to no remat (1.0 without remat).
        fits: ``peak_bytes <= memory`` (``None`` without a limit).
        max_batch: largest batch size predicted to fit (``None`` without a limit; 0 when none does).
        note: how a figure was obtained when it is not measured on meta (e.g. a state formula), else ``""``.
    """

    optimizer: str
    remat: float | None
    peak_bytes: int
    breakdown: dict[str, int]
    step_overhead: float
    fits: bool | None
    max_batch: int | None
    note: str = ""


@dataclass(kw_only=True)
class Estimate:
    """What :func:`estimate` predicted.

    Attributes:
        model: the model's name.
        n_params: its parameter count.
        batch_size: examples per batch.
        seq_len: tokens per example (language models) or image side.
        memory: the limit in bytes, or ``None``.
        rows: one :class:`PlanRow` per optimizer and feasible remat setting.
        notes: remat settings left out (infeasible budgets) and why.
        seconds: wall time of the estimate.
    """

    model: str
    n_params: int
    batch_size: int
    seq_len: int
    memory: int | None
    rows: list[PlanRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def best(self) -> PlanRow | None:
        """The fastest setting that fits (least overhead, then least memory), or ``None``."""
        fitting = [r for r in self.rows if r.fits]
        return min(fitting, key=lambda r: (r.step_overhead, r.peak_bytes)) if fitting else None

    def table(self) -> Any:
        """A ``rich.table.Table`` of the rows."""
        from rich.table import Table

        limit = f", limit {format_bytes(self.memory)}" if self.memory else ""
        table = Table(
            title=f"memfit plan: {self.model} ({self.n_params:,} parameters), batch {self.batch_size}x{self.seq_len}"
            f"{limit}",
            caption="predicted without allocating (meta tensors); overhead: forward + backward compute vs no remat",
        )
        for col in ("optimizer", "remat", "peak", "params", "grads", "opt state", "activations", "overhead"):
            table.add_column(col, justify="left" if col == "optimizer" else "right")
        if self.memory:
            table.add_column("fits")
            table.add_column("max batch", justify="right")
        for r in self.rows:
            b = r.breakdown
            cells = [
                r.optimizer,
                "none" if r.remat is None else f"{r.remat:.0%}",
                format_bytes(r.peak_bytes),
                format_bytes(b["parameters"]),
                format_bytes(b["gradients"]),
                format_bytes(b["optimizer_state"]),
                format_bytes(b["activations"] + b["inputs"]),
                f"{r.step_overhead:.2f}x",
            ]
            if self.memory:
                cells += ["[green]yes[/]" if r.fits else "[red]no[/]", str(r.max_batch)]
            table.add_row(*cells)
        return table


def _group(breakdown: dict[str, int]) -> dict[str, int]:
    return {
        "parameters": breakdown.get("parameters", 0) + breakdown.get("buffers", 0),
        "gradients": breakdown.get("gradients", 0),
        "optimizer_state": breakdown.get("optimizer_state", 0),
        "activations": breakdown.get("activations", 0) + breakdown.get("temporaries", 0),
        "inputs": breakdown.get("inputs", 0),
    }


def _forward_backward(model: nn.Module, spec: ModelSpec, batch: Any) -> MemoryReport:
    for p in model.parameters():
        p.grad = None
    with track(model, inputs=batch) as t:
        spec.loss_fn(model, batch).backward()
    return t.report


def _state_formula(name: str, params: Sequence[torch.Tensor]) -> int:
    """Optimizer state bytes from the optimizers' own memory formulas (for those that cannot step on meta)."""
    total = 0
    for p in params:
        if name == "adafactor":
            # torch.optim.Adafactor: a row and a column factor for rank >= 2, a full variance for rank 1
            if p.dim() >= 2:
                total += (p.numel() // p.shape[-1] + p.numel() // p.shape[-2]) * 4
            else:
                total += p.numel() * 4
            total += 4  # the step count
        elif name == "countsketch":
            if p.dim() >= 2:
                n, row = p.shape[0], p.numel() // p.shape[0]
                total += 2 * 3 * math.ceil(0.2 * n) * row * 4
            else:
                total += 2 * p.numel() * 4
            total += 4
        else:
            raise ValueError(f"no state formula for {name!r}")
    return total


@dataclass
class _OptPhase:
    state_bytes: int
    update_peak: int
    update_breakdown: dict[str, int]
    note: str


def _optimizer_phase(name: str, model: nn.Module) -> _OptPhase:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make_optimizer(name, params)
    try:
        opt.step()  # creates the state
        with track(model, opt) as t:
            opt.step()
    except RuntimeError as exc:
        if "meta" not in str(exc):
            raise
        state = _state_formula(name, params)
        p_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        b_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        g_bytes = sum(p.numel() * p.element_size() for p in params)
        temp = max(p.numel() * p.element_size() for p in params)
        breakdown = {
            "parameters": p_bytes,
            "buffers": b_bytes,
            "gradients": g_bytes,
            "optimizer_state": state,
        }
        breakdown["temporaries"] = temp
        return _OptPhase(state, sum(breakdown.values()), breakdown, "state from formula")
    finally:
        for p in params:
            p.grad = None
    rep = t.report
    return _OptPhase(
        rep.baseline_breakdown["optimizer_state"], rep.total_peak_bytes, dict(rep.peak_breakdown), ""
    )


def estimate(
    model: str | ModelSpec,
    batch_size: int,
    seq_len: int | None = None,
    *,
    memory: int | str | None = None,
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
    remat: Sequence[float | None] = (None, 0.5, 0.25),
    method: str = "budget",
    progress: Callable[[str], None] | None = None,
) -> Estimate:
    """Predict the peak memory of a training step for each optimizer and remat setting, allocating nothing.

    Args:
        model: a preset or import path of :func:`memfit.models.get_model`, or a :class:`ModelSpec`.
        batch_size: examples per batch.
        seq_len: tokens per example (default: the preset's).
        memory: a limit (bytes or ``"24GiB"``); rows then say whether they fit and the largest batch that does.
        optimizers: keys of :data:`OPTIMIZERS`.
        remat: remat settings: ``None`` (no recomputation) and budgets in (0, 1] (fractions of the no-remat
            step's memory beyond parameters, buffers and batch).
        method: the remat solver (see :func:`memfit.remat.solve`).
        progress: called with a short message before each phase.

    Returns:
        The :class:`Estimate`.

    Raises:
        ValueError: an unknown optimizer, a bad budget, size or batch.
        memfit.remat.UnsupportedGraph: a remat setting was asked for and the step cannot be captured.
    """
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    spec = model if isinstance(model, ModelSpec) else get_model(model)
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    for r in remat:
        if r is not None and not 0.0 < r <= 1.0:
            raise ValueError(f"a remat budget must be None or in (0, 1], got {r}")
    limit = parse_bytes(memory) if memory is not None else None
    seq = seq_len if seq_len is not None else spec.seq_len
    with torch.device("meta"):
        net = spec.build()
    net.train()
    batch = spec.example_batch(batch_size, seq, device="meta")
    say("forward + backward on meta tensors")
    fb = _forward_backward(net, spec, batch)
    fixed = _group(fb.peak_breakdown)
    fixed_bytes = fixed["parameters"]  # + gradients + state: per optimizer below
    # memory that grows with the batch: everything at the peak but parameters and the gradients already made
    var1 = fb.total_peak_bytes - fixed_bytes
    slope = max(var1 - fixed["gradients"], 1) / batch_size
    intercept = var1 - slope * batch_size  # gradients resident at the peak, mostly

    est = Estimate(
        model=spec.name,
        n_params=sum(p.numel() for p in net.parameters()),
        batch_size=batch_size,
        seq_len=seq,
        memory=limit,
    )
    batch_bytes = fixed["inputs"]
    captured: Any = None
    plans: dict[float, tuple[int, int, float]] = {}  # budget -> (non-input peak, grads at peak, overhead)
    budgets = [r for r in remat if r is not None]
    if budgets:
        from memfit import remat as _remat

        say("capturing the step for remat (fake tensors)")
        slice_net, sliced = net, False
        if spec.gpt is not None and spec.gpt.n_layer > _REMAT_LAYERS:
            with torch.device("meta"):
                slice_net = GPT(dataclasses.replace(spec.gpt, n_layer=_REMAT_LAYERS))
            sliced = True
            est.notes.append(
                f"remat rows: scheduled on a {_REMAT_LAYERS}-block slice of the {spec.gpt.n_layer}-block model; "
                "overhead from the slice, peak = budget x the full model's no-remat memory beyond inputs, feasible above "
                "the slice's least memory + one block input per further block"
            )
        captured = _remat.capture(slice_net, spec.loss_fn, batch)  # type: ignore[operator]  # lazy export
        graph = captured.graph
        inputs = captured.input_bytes
        base = _remat.solve(graph, None, method="noremat").simulate()
        noninput = base.peak - inputs
        if sliced:
            plans.update(
                _sliced_plans(
                    spec,
                    graph,
                    inputs,
                    noninput,
                    budgets,
                    fb,
                    fixed_bytes + batch_bytes,
                    batch_size,
                    seq,
                    method,
                    est.notes,
                )
            )
        for b in budgets if not sliced else ():
            say(f"solving remat at {b:.0%}")
            try:
                sched = _remat.solve(graph, inputs + int(b * noninput), method=method)  # type: ignore[arg-type]
            except _remat.InfeasibleBudget as exc:
                est.notes.append(
                    f"remat {b:.0%}: infeasible ({method} reaches {format_bytes(exc.min_peak - inputs)} beyond inputs "
                    f"at best, {(exc.min_peak - inputs) / max(noninput, 1):.0%} of no remat)"
                )
                continue
            sim = sched.simulate()
            overhead = sim.cost / base.cost if base.cost else 1.0
            plans[b] = (sim.peak - inputs, _outputs_at_peak(sched, sim), overhead)

    for name in optimizers:
        say(f"optimizer {name}")
        opt = _optimizer_phase(name, net)
        for r in remat:
            if r is not None and r not in plans:
                continue
            if r is None:
                bd = _group(fb.peak_breakdown)
                bd["optimizer_state"] = opt.state_bytes
                peak_fb = fb.total_peak_bytes + opt.state_bytes
                overhead = 1.0
                slope_r, intercept_r = slope, intercept
            else:
                noninput, grads, overhead = plans[r]
                bd = {
                    "parameters": fixed["parameters"],
                    "gradients": grads,
                    "optimizer_state": opt.state_bytes,
                    "activations": noninput - grads,
                    "inputs": batch_bytes,
                }
                peak_fb = sum(bd.values())
                slope_r, intercept_r = slope * r, intercept
            peak = peak_fb
            if opt.update_peak > peak_fb:
                peak, bd = opt.update_peak, _group(opt.update_breakdown)
            fits = None if limit is None else peak <= limit
            max_batch = None
            if limit is not None:
                room = limit - fixed_bytes - opt.state_bytes - intercept_r
                by_fb = int(room // slope_r) if room > 0 else 0
                max_batch = by_fb if opt.update_peak <= limit else 0
            est.rows.append(
                PlanRow(
                    optimizer=name,
                    remat=r,
                    peak_bytes=peak,
                    breakdown=bd,
                    step_overhead=overhead,
                    fits=fits,
                    max_batch=max_batch,
                    note=opt.note,
                )
            )
    est.seconds = time.perf_counter() - t0
    return est


def _sliced_plans(
    spec: ModelSpec,
    graph: Any,
    inputs: int,
    slice_noninput: int,
    budgets: Sequence[float],
    fb: MemoryReport,
    resident: int,
    batch_size: int,
    seq: int,
    method: str,
    notes: list[str],
) -> dict[float, tuple[int, int, float]]:
    """Remat predictions of a deep GPT from a schedule of its slice (see the module docstring).

    The full model needs at least what the slice needs plus, for each further block, its input (B x T x C floats:
    the checkpoint a block boundary keeps); a budget above that is taken as met. The overhead is the slice's at
    the same fraction, or at the slice's smallest feasible budget when the fraction is below it (an upper bound).
    """
    from memfit import remat as _remat

    assert spec.gpt is not None
    base = _remat.solve(graph, None, method="noremat").simulate()
    try:
        _remat.solve(graph, inputs + 1, method=method)  # type: ignore[arg-type]
        slice_min = 1
    except _remat.InfeasibleBudget as exc:
        slice_min = exc.min_peak - inputs
    boundary = batch_size * seq * spec.gpt.n_embd * 4
    full_noninput = fb.total_peak_bytes - resident
    full_min = slice_min + (spec.gpt.n_layer - _REMAT_LAYERS) * boundary
    plans: dict[float, tuple[int, int, float]] = {}
    for b in budgets:
        target = int(b * full_noninput)
        if target < full_min:
            notes.append(
                f"remat {b:.0%}: infeasible (needs at least ~{format_bytes(full_min)} beyond inputs, "
                f"{full_min / full_noninput:.0%} of no remat)"
            )
            continue
        budget = inputs + max(int(b * slice_noninput), int(slice_min * 1.02))
        sched = _remat.solve(graph, budget, method=method)  # type: ignore[arg-type]
        sim = sched.simulate()
        plans[b] = (
            target,
            0,
            sim.cost / base.cost if base.cost else 1.0,
        )  # a rematted step peaks in the forward
    return plans


def _outputs_at_peak(schedule: Any, sim: Any) -> int:
    """Bytes of output values (gradients, loss) resident at the schedule's peak."""
    import numpy as np

    graph = schedule.graph
    at = int(np.argmax(sim.memory))
    resident: set[int] = set(graph.inputs)
    for kind, v in schedule.events[: at + 1]:
        if kind == "compute":
            resident.add(v)
        else:
            resident.discard(v)
    return sum(graph.nbytes(v) for v in resident if graph.is_output(v))
