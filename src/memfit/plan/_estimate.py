"""``memfit.plan.estimate``: will this training step fit in N GiB, with which optimizer, precision and remat
budget, and how long will it take? Answered before anything is allocated.

How each figure is obtained (see ``docs/plan.md``):

- **forward + backward**: the user's ``loss_fn(model, batch).backward()`` runs on fake tensors on the planned
  device under :func:`memfit.memory.track` (:mod:`memfit.plan._trace`): same ops, same order, no data.
- **optimizer**: one ``step()`` makes the state, a second is tracked (:mod:`memfit.plan._optimizers`), on the
  path the real step takes; the fused CPU SM3 kernel is modelled from its source.
- **step peak**: the larger of the forward/backward peak with the state resident and the update's peak with
  the batch resident.
- **remat**: :func:`memfit.remat.capture` traces the step, :func:`memfit.remat.solve` schedules it under
  ``budget x (no-remat peak beyond inputs)``; the schedule's simulated peak and cost give the peak and the
  compute overhead. GPTs deeper than :data:`_REMAT_LAYERS` blocks are scheduled on a slice.
- **largest batch**: two traces give the memory at every timeline point as a line in the batch size
  (:mod:`memfit.plan._search`); the largest batch whose peak fits is found by bisection.
- **time**: every traced op at calibrated rates (:func:`memfit.remat.calibrate`): FLOPs, bytes moved, dispatch.
- **step inside the backward** (``step_in_backward=True``): rows with each gradient freed at its update
  (:mod:`memfit.plan._in_backward`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from memfit.memory import MemoryReport, format_bytes
from memfit.models import GPT, ModelSpec, get_model
from memfit.plan._in_backward import (
    ConsumedRemat,
    consumed_remat_plans,
    sliced_consumed_plans,
    step_timeline,
    timeline_curve,
)
from memfit.plan._optimizers import OPTIMIZERS, UpdateTrace, settings, trace_param_updates, trace_update
from memfit.plan._rows import Estimate, PlanRow, parse_bytes
from memfit.plan._search import PeakCurve, largest_batch
from memfit.plan._slice import slice_budgets
from memfit.plan._trace import Env, trace_forward_backward
from memfit.plan._workload import PRECISIONS, PlanInputError, Workload, from_module, from_spec

__all__ = ["DEFAULT_OPTIMIZERS", "estimate"]

_REMAT_LAYERS = 4  # blocks of the slice a deep GPT's remat schedule is solved on
DEFAULT_OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZERS)


def _group(breakdown: dict[str, int]) -> dict[str, int]:
    return {
        "parameters": breakdown.get("parameters", 0) + breakdown.get("buffers", 0),
        "gradients": breakdown.get("gradients", 0),
        "optimizer_state": breakdown.get("optimizer_state", 0),
        "activations": breakdown.get("activations", 0) + breakdown.get("temporaries", 0),
        "inputs": breakdown.get("inputs", 0),
    }


def estimate(
    model: str | ModelSpec | Workload | nn.Module | Callable[[], nn.Module],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | int,
    batch: Any = None,
    *,
    memory: int | str | None = None,
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    remat: Sequence[float | None] = (None, 0.5, 0.25),
    precision: str = "fp32",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    method: str = "budget",
    timing: bool = True,
    progress: Callable[[str], None] | None = None,
    step_in_backward: bool = False,
) -> Estimate:
    """Predict peak memory and step time of a training step per optimizer and remat setting, allocating nothing.

    Two forms::

        estimate(model, loss_fn, batch, memory="24GiB", precision="bf16-autocast")   # any model
        estimate("gpt2-xl", 8, 1024, memory="24GiB")                                # a preset, batch 8x1024

    Args:
        model: an ``nn.Module`` on any device (copied onto ``meta``: nothing of it is allocated), a zero-argument
            factory (called under ``torch.device("meta")``), a preset name or import path of
            :func:`memfit.models.get_model`, a :class:`memfit.models.ModelSpec`, or a :class:`Workload`.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; for a preset: the batch size.
        batch: a tensor or pytree of tensors (real, meta or fake; dim 0 is the batch axis); for a preset: the
            sequence length (default: the preset's).
        memory: a limit (bytes or ``"24GiB"``); rows then say whether they fit and the largest batch that does.
        optimizers: keys of :data:`memfit.plan.OPTIMIZERS`.
        remat: ``None`` (no recomputation) and budgets in (0, 1] (fractions of the no-remat step's memory
            beyond parameters, buffers and batch).
        precision: ``"fp32"``; ``"bf16"`` (parameters, gradients and float batch tensors in bfloat16);
            ``"bf16-autocast"`` (float32 parameters, forward under ``torch.autocast(dtype=torch.bfloat16)``);
            ``"fp16-autocast"`` (the same in float16, with a ``torch.amp.GradScaler``).
        batch_size: plan this batch size (a user batch is scaled along dim 0); default: the batch's own.
        device: the device planned for (default: the module's, else ``"cpu"``).
        method: the remat solver (see :func:`memfit.remat.solve`).
        timing: predict step times at this machine's calibrated rates (planning for a device this machine does
            not have gives no times).
        progress: called with a short message before each phase.
        step_in_backward: also plan each row with the optimizer step inside the backward
            (:func:`memfit.optim.step_in_backward`: each gradient freed right after its parameter's update), as
            rows with ``grads_resident=False`` next to the ordinary ones. Their remat budgets are fractions of the
            in-backward step's own no-remat memory beyond inputs, as ``memfit.remat.compile`` takes them with the
            hooks active.

    Returns:
        The :class:`Estimate`.

    Raises:
        PlanInputError: a model, loss or batch the planner cannot use (the message says which), a ``cuda`` device
            with a torch built without CUDA, or
            ``step_in_backward`` with ``"fp16-autocast"`` (a ``GradScaler`` must see every gradient before a step).
        ValueError: an unknown optimizer or precision, a bad budget, size or batch.
        memfit.remat.UnsupportedGraph: a remat setting was asked for and the step cannot be captured.
    """
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    for r in remat:
        if r is not None and not 0.0 < r <= 1.0:
            raise ValueError(f"a remat budget must be None or in (0, 1], got {r}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if step_in_backward and precision == "fp16-autocast":
        raise PlanInputError(
            "step_in_backward cannot be planned with fp16-autocast: its GradScaler must unscale and check every "
            "gradient for inf/NaN before any update, which an update inside the backward cannot wait for; use "
            "bf16-autocast, bf16 or fp32"
        )
    limit = parse_bytes(memory) if memory is not None else None
    work = _workload(model, loss_fn, batch, batch_size)
    dev = torch.device(device) if device is not None else _device_of(model)
    if dev.type == "cuda" and not torch.backends.cuda.is_built():
        # fake CUDA tensors need no GPU, but a torch built with CUDA: without it the backward aborts the process
        raise PlanInputError(
            f"cannot plan for {dev}: this torch ({torch.__version__}) is built without CUDA; planning for cuda "
            "needs a CUDA build of torch (no GPU needed), or plan for cpu"
        )
    autocast = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(precision)
    scaler = precision == "fp16-autocast"
    env = Env(
        dev,
        _rates(dev) if timing else None,
        meta=work.gpt is not None and autocast is None and dev.type == "cpu",
    )
    deep = work.gpt is not None and work.gpt.n_layer > _REMAT_LAYERS
    if deep:
        assert work.gpt is not None
        with torch.device("meta"):  # its optimizers step on a slice of the model: see _scaled_update
            meta_net = _cast(GPT(dataclasses.replace(work.gpt, n_layer=_REMAT_LAYERS)), precision)
    else:
        meta_net = _cast(work.build(), precision)  # the optimizers step on its meta parameters
    net = _cast(work.build(), precision)
    net.train()
    net = env.module(net)
    param_dtype = next((p.dtype for p in net.parameters()), torch.float32)

    def traced(b: int, consume: bool = False) -> tuple[MemoryReport, float, int]:
        fake = env.batch(_cast_batch(work.make_batch(b), precision))
        step = trace_forward_backward(
            env, net, work.loss_fn, fake, autocast=autocast, scale_loss=scaler, consume_grads=consume
        )
        return step.report, step.seconds, _group(step.report.baseline_breakdown)["inputs"]

    B = work.batch_size
    say("forward + backward traced without data")
    fb, fb_seconds, batch_bytes = traced(B)
    curve: PeakCurve | None = None
    if limit is not None:
        say("forward + backward at twice the batch (memory as a function of the batch size)")
        fb2 = traced(2 * B)[0]
        curve = PeakCurve(B, fb.timeline_total, 2 * B, fb2.timeline_total)
    fixed = _group(fb.peak_breakdown)
    resident = fixed["parameters"]  # parameters and buffers
    consumed: list[MemoryReport] = []  # the forward + backward with each gradient freed at its update (B, 2B)
    if step_in_backward:
        say("forward + backward with the step inside it (each gradient freed at its update)")
        consumed = [traced(B, consume=True)[0]]
        if limit is not None:
            consumed.append(traced(2 * B, consume=True)[0])
    shapes: dict[str, torch.Tensor] = dict(net.named_parameters())

    est = Estimate(
        model=work.name,
        n_params=sum(p.numel() for p in net.parameters()),
        batch_size=B,
        seq_len=work.seq_len,
        memory=limit,
        precision=precision,
        device=str(dev),
    )
    if env.rates is None and timing:
        est.notes.append(f"no step times: this machine cannot calibrate {dev}")
    plans, ib_plans = _remat_plans(
        work, precision, autocast, dev, remat, fb, resident + batch_bytes, method, est.notes, say,
        consumed[0] if consumed else None, net,
    )  # fmt: skip

    for name in optimizers:
        say(f"optimizer {name}")
        upd = trace_update(env, name, meta_net, grad_scaler=scaler)
        if deep:
            upd = _scaled_update(upd, meta_net, net)
        upd_peak = upd.peak_bytes + batch_bytes  # the batch is still held while the optimizer steps
        for r in remat:
            if r is not None and r not in plans:
                continue
            if r is None:
                bd = dict(fixed)
                bd["optimizer_state"] = upd.state_bytes
                peak_fb = fb.total_peak_bytes + upd.state_bytes
                overhead, ratio = 1.0, 1.0
            else:
                noninput, grads, overhead = plans[r]
                bd = {
                    "parameters": resident,
                    "gradients": grads,
                    "optimizer_state": upd.state_bytes,
                    "activations": noninput - grads,
                    "inputs": batch_bytes,
                }
                peak_fb = sum(bd.values())
                ratio = noninput / max(fb.total_peak_bytes - resident - batch_bytes, 1)
            peak = peak_fb
            if upd_peak > peak_fb:
                peak, bd = upd_peak, _group(upd.breakdown)
                bd["inputs"] = batch_bytes
            max_batch = None
            if limit is not None and curve is not None:
                max_batch = largest_batch(_peak_at(curve, upd, resident, batch_bytes / B, ratio), limit)
            step_s = fb_seconds * overhead + upd.seconds if env.rates is not None else None
            est.rows.append(
                PlanRow(
                    optimizer=name,
                    remat=r,
                    peak_bytes=int(peak),
                    breakdown={k: int(v) for k, v in bd.items()},
                    step_overhead=overhead,
                    fits=None if limit is None else peak <= limit,
                    max_batch=max_batch,
                    note=upd.note,
                    settings=settings(name, dev, param_dtype),
                    step_seconds=step_s,
                    update_seconds=upd.seconds if env.rates is not None else None,
                )
            )
        if step_in_backward:
            est.rows.extend(
                _in_backward_rows(
                    env, name, meta_net, net, upd.state_bytes, remat, consumed, ib_plans, shapes,
                    resident, batch_bytes, fb_seconds, limit, B, upd.note, param_dtype,
                )
            )  # fmt: skip
    est.seconds = time.perf_counter() - t0
    return est


def _in_backward_rows(
    env: Env,
    name: str,
    meta_net: nn.Module,
    net: nn.Module,
    state: int,
    remat: Sequence[float | None],
    consumed: list[MemoryReport],
    ib_plans: dict[float, ConsumedRemat],
    shapes: dict[str, torch.Tensor],
    resident: int,
    batch_bytes: int,
    fb_seconds: float,
    limit: int | None,
    B: int,
    note: str,
    param_dtype: torch.dtype,
) -> list[PlanRow]:
    """The rows of optimizer ``name`` with its step inside the backward (see :mod:`memfit.plan._in_backward`)."""
    upd = trace_param_updates(env, name, meta_net)
    params = [p for p in net.parameters() if p.requires_grad]
    upd_seconds = upd.total_seconds(params)
    lines = [step_timeline(rep, shapes, upd, state) for rep in consumed]
    rows: list[PlanRow] = []
    for r in remat:
        if r is not None and r not in ib_plans:
            continue
        if r is None:
            line = lines[0]
            peak = int(line.total[line.peak_index])
            bd = _group(consumed[0].breakdown_at(line.peak_index))
            bd["optimizer_state"] = state
            bd["activations"] += line.temporaries_at_peak
            overhead = 1.0
        else:
            beyond, grads = ib_plans[r].peak(upd)
            bd = {
                "parameters": resident,
                "gradients": grads,
                "optimizer_state": state,
                "activations": beyond - grads,
                "inputs": batch_bytes,
            }
            peak = sum(bd.values())
            overhead = ib_plans[r].overhead
        max_batch = None
        if limit is not None and len(lines) == 2:
            if r is None:
                curve = timeline_curve(B, lines[0], 2 * B, lines[1])
                max_batch = largest_batch(curve, limit)
            else:
                peak_at = _consumed_peak_at(consumed, B, resident, batch_bytes / B, peak - state, state)
                max_batch = largest_batch(peak_at, limit)
        step_s = fb_seconds * overhead + upd_seconds if env.rates is not None else None
        rows.append(
            PlanRow(
                optimizer=name,
                remat=r,
                peak_bytes=peak,
                breakdown={k: int(v) for k, v in bd.items()},
                step_overhead=overhead,
                fits=None if limit is None else peak <= limit,
                max_batch=max_batch,
                note=(note + "; " if note else "") + "optimizer step inside the backward",
                settings=settings(name, env.device, param_dtype),
                step_seconds=step_s,
                update_seconds=upd_seconds if env.rates is not None else None,
                grads_resident=False,
            )
        )
    return rows


def _consumed_peak_at(
    consumed: list[MemoryReport],
    B: int,
    resident: int,
    batch_per_example: float,
    peak_without_state: int,
    state: int,
) -> Callable[[int], float]:
    """An in-backward remat row's peak at batch ``b``: its memory beyond inputs scales as the in-backward trace's
    (as :func:`_peak_at` scales an ordinary remat row's with the ordinary trace)."""
    curve = PeakCurve(B, consumed[0].timeline_total, 2 * B, consumed[1].timeline_total)
    inputs = resident + batch_per_example * B
    ratio = (peak_without_state - inputs) / max(curve(B) - inputs, 1)

    def peak(b: int) -> float:
        at_b = resident + batch_per_example * b
        return at_b + ratio * (curve(b) - at_b) + state

    return peak


def _scaled_update(upd: UpdateTrace, part: nn.Module, full: nn.Module) -> UpdateTrace:
    """The update of ``full`` from its trace on ``part``, a model with the same parameter shapes, fewer blocks.

    Each parameter's state depends on its shape and dtype only, so the full model's state is the sum of the
    state per parameter of each shape; the update's temporaries of a for-loop or fused kernel are those of the
    parameter being updated (the slice holds every shape), so they carry over.
    """
    part_bytes = sum(p.numel() * p.element_size() for p in part.parameters())
    per = upd.state_by_shape
    if not part_bytes or per is None:
        return upd
    full_state = sum(per.get((tuple(p.shape), p.dtype), 0) for p in full.parameters())
    resident = {
        "parameters": sum(p.numel() * p.element_size() for p in full.parameters()),
        "buffers": sum(b.numel() * b.element_size() for b in full.buffers()),
        "gradients": sum(p.numel() * p.element_size() for p in full.parameters() if p.requires_grad),
    }
    temps = upd.breakdown.get("temporaries", 0) + upd.breakdown.get("activations", 0)
    breakdown = {**resident, "optimizer_state": int(full_state), "temporaries": temps}
    scale = resident["parameters"] / part_bytes
    return UpdateTrace(
        state_bytes=int(full_state),
        peak_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        seconds=upd.seconds * scale,
        note=(upd.note + "; " if upd.note else "") + "update traced on a slice of the model",
    )


def _peak_at(
    curve: PeakCurve, upd: UpdateTrace, resident: int, batch_per_example: float, ratio: float
) -> Callable[[int], float]:
    """The step's peak at batch size ``b``: remat scales the memory beyond inputs by ``ratio``."""

    def peak(b: int) -> float:
        inputs = resident + batch_per_example * b
        fb = inputs + ratio * (curve(b) - inputs) + upd.state_bytes
        return max(fb, upd.peak_bytes + batch_per_example * b)

    return peak


def _workload(model: Any, loss_fn: Any, batch: Any, batch_size: int | None) -> Workload:
    if isinstance(model, Workload):
        return model
    if isinstance(model, (str, ModelSpec)):
        if not isinstance(loss_fn, int) or isinstance(loss_fn, bool):
            raise PlanInputError(
                "a preset is planned as estimate(name, batch_size, seq_len); for your own model pass "
                "estimate(module_or_factory, loss_fn, batch)"
            )
        spec = model if isinstance(model, ModelSpec) else get_model(model)
        return from_spec(spec, batch_size or loss_fn, batch)
    if isinstance(loss_fn, int):
        raise PlanInputError("estimate(model, loss_fn, batch): loss_fn must be callable, got an int")
    return from_module(model, loss_fn, batch, batch_size=batch_size)


def _device_of(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def _rates(dev: torch.device) -> Any:
    if dev.type == "cuda" and not torch.cuda.is_available():
        return None
    if dev.type not in ("cpu", "cuda"):
        return None
    from memfit.remat import calibrate

    return calibrate(dev)  # type: ignore[operator]  # lazy export


def _cast(module: nn.Module, precision: str) -> nn.Module:
    return module.to(torch.bfloat16) if precision == "bf16" else module


def _cast_batch(batch: Any, precision: str) -> Any:
    if precision != "bf16":
        return batch
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, batch
    )


@contextlib.contextmanager
def _capture_in(env: Env) -> Iterator[None]:
    """:func:`memfit.remat.capture` makes its fake batch in ``env``'s fake mode, the mode of the fake parameters.

    ``capture`` takes a fresh mode from ``memfit._compat.fake_tensor_mode``; parameters faked by another mode
    cannot meet its batch. Capturing fake parameters on the planned device (not ``meta``) is what lets the trace
    take the device's kernels (``F.cross_entropy``'s ``nll_loss`` has no autograd on ``meta``; SDPA's fused
    kernel) and its autocast. A ``fake_mode=`` argument of ``capture`` would make this swap unnecessary.
    """
    from memfit import _compat

    made = _compat.fake_tensor_mode
    _compat.fake_tensor_mode = lambda: env.mode
    try:
        yield
    finally:
        _compat.fake_tensor_mode = made


def _remat_plans(
    work: Workload,
    precision: str,
    autocast: torch.dtype | None,
    dev: torch.device,
    remat: Sequence[float | None],
    fb: MemoryReport,
    inputs_resident: int,
    method: str,
    notes: list[str],
    say: Callable[[str], None],
    consumed_fb: MemoryReport | None = None,
    full_net: nn.Module | None = None,
) -> tuple[dict[float, tuple[int, int, float]], dict[float, ConsumedRemat]]:
    """budget -> (peak beyond inputs, gradients resident at that peak, compute overhead) of each feasible budget;
    with ``consumed_fb`` (the forward + backward traced with the step inside it), also budget -> the schedule with
    the gradients consumed in the backward."""
    budgets = [r for r in remat if r is not None]
    if not budgets:
        return {}, {}
    from memfit import remat as _remat

    say("capturing the step for remat (fake tensors)")
    env = Env(dev)
    net = _cast(work.build(), precision)
    batch = env.batch(_cast_batch(work.make_batch(work.batch_size), precision))
    sliced = work.gpt is not None and work.gpt.n_layer > _REMAT_LAYERS
    if sliced:
        assert work.gpt is not None
        with torch.device("meta"):
            net = _cast(GPT(dataclasses.replace(work.gpt, n_layer=_REMAT_LAYERS)), precision)
    net.train()
    net = env.module(net)
    loss_fn = work.loss_fn
    if autocast is not None:

        def loss_fn(model: nn.Module, b: Any) -> torch.Tensor:
            with torch.autocast(dev.type, dtype=autocast):
                return work.loss_fn(model, b)

    if sliced:
        assert work.gpt is not None
        notes.append(
            f"remat rows: scheduled on a {_REMAT_LAYERS}-block slice of the {work.gpt.n_layer}-block model; "
            "overhead from the slice, peak = budget x the full model's no-remat memory beyond inputs, feasible "
            "above the slice's least memory + one block input per further block"
        )
    with _capture_in(env):
        captured = _remat.capture(net, loss_fn, batch)  # type: ignore[operator]  # lazy export
    graph = captured.graph
    inputs = captured.input_bytes
    base = _remat.solve(graph, None, method="noremat").simulate()
    noninput = base.peak - inputs
    if sliced:
        assert work.gpt is not None
        ib_sliced: dict[float, ConsumedRemat] = {}
        if consumed_fb is not None and full_net is not None:
            boundary = work.batch_size * (work.seq_len or 1) * work.gpt.n_embd * 4
            ib_sliced = sliced_consumed_plans(
                captured,
                [p for p in full_net.parameters() if p.requires_grad],
                budgets,
                method,
                consumed_fb.total_peak_bytes - inputs_resident,
                (work.gpt.n_layer - _REMAT_LAYERS) * boundary,
                notes,
            )
        return _sliced_plans(work, graph, inputs, budgets, fb, inputs_resident, method, notes), ib_sliced
    ib_plans = {}
    if consumed_fb is not None:
        ib_plans = consumed_remat_plans(captured, net, budgets, method, notes, say)
    plans: dict[float, tuple[int, int, float]] = {}
    for b in budgets:
        say(f"solving remat at {b:.0%}")
        try:
            sched = _remat.solve(graph, inputs + int(b * noninput), method=method)  # type: ignore[arg-type]
        except _remat.InfeasibleBudget as exc:
            notes.append(
                f"remat {b:.0%}: infeasible ({method} reaches {format_bytes(exc.min_peak - inputs)} beyond inputs "
                f"at best, {(exc.min_peak - inputs) / max(noninput, 1):.0%} of no remat)"
            )
            continue
        sim = sched.simulate()
        overhead = sim.cost / base.cost if base.cost else 1.0
        plans[b] = (sim.peak - inputs, _outputs_at_peak(sched, sim), overhead)
    return plans, ib_plans


def _sliced_plans(
    work: Workload,
    graph: Any,
    inputs: int,
    budgets: Sequence[float],
    fb: MemoryReport,
    resident: int,
    method: str,
    notes: list[str],
) -> dict[float, tuple[int, int, float]]:
    """Remat predictions of a deep GPT from a schedule of its slice (see the module docstring).

    The full model needs at least what the slice needs plus, for each further block, its input (B x T x C floats:
    the checkpoint a block boundary keeps); a budget above that is taken as met. The overhead is the slice's at
    the same fraction, or at the slice's smallest feasible budget when the fraction is below it (an upper bound).
    """
    from memfit import remat as _remat

    assert work.gpt is not None
    boundary = work.batch_size * (work.seq_len or 1) * work.gpt.n_embd * 4
    sliced = slice_budgets(
        lambda budget, m: _remat.solve(graph, budget, method=m),  # type: ignore[arg-type]
        inputs,
        fb.total_peak_bytes - resident,
        (work.gpt.n_layer - _REMAT_LAYERS) * boundary,
        budgets,
        method,
        notes,
    )
    return {
        b: (target, 0, overhead) for b, (target, overhead) in sliced.items()
    }  # a rematted step peaks in the forward


def _outputs_at_peak(schedule: Any, sim: Any) -> int:
    """Bytes of output values (gradients, loss) resident at the schedule's peak."""
    import numpy as np

    graph = schedule.graph
    at = int(np.argmax(sim.memory))
    live: set[int] = set(graph.inputs)
    for kind, v in schedule.events[: at + 1]:
        if kind == "compute":
            live.add(v)
        else:
            live.discard(v)
    return sum(graph.nbytes(v) for v in live if graph.is_output(v))
