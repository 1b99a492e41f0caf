"""Rows with the optimizer step inside the backward (:func:`memfit.optim.step_in_backward`): gradients never all
resident.

With the step in the backward, each parameter's update runs as soon as its gradient is final and the gradient is
freed right after; ``optimizer.step()`` after the backward is a no-op. The step's peak is therefore the peak of the
backward itself, where at each update the memory holds everything the backward holds at that moment, the optimizer
state, and the update's own temporaries (for one parameter). Predicted two ways, as the ordinary rows are:

- **no remat**: the forward + backward is traced with a hook on every parameter that marks the timeline where the
  update would run and frees the gradient (:func:`memfit.plan._trace.trace_forward_backward` with
  ``consume_grads``); each parameter's update is traced on its own (:func:`memfit.plan._optimizers.
  trace_param_updates`); the step's timeline is the traced one + the state, + the temporaries of parameter ``p``'s
  update at ``p``'s mark. Its maximum is the peak; two traces give it at every batch size
  (:class:`memfit.plan._search.PeakCurve`).
- **remat**: :func:`memfit.remat.eager.updates.sink_gradients` gives the captured graph an update node per
  parameter that consumes its gradient, as :func:`memfit.remat.compile` builds it when ``step_in_backward`` is
  active, and the solver schedules each gradient to die after its update. The budget is a fraction of *this*
  step's no-remat memory beyond inputs (what ``compile(budget=0.5)`` means with the hooks active). The
  schedule's memory after every event + the state, + the update's temporaries at each update event, gives the
  peak. A GPT preset deeper than the remat slice follows the ordinary rows' rule for it
  (:func:`sliced_consumed_plans`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from memfit.memory import MemoryReport, format_bytes
from memfit.plan._optimizers import ParamUpdates, param_key
from memfit.plan._search import PeakCurve
from memfit.plan._slice import slice_budgets

__all__ = ["ConsumedRemat", "StepTimeline", "consumed_remat_plans", "sliced_consumed_plans", "step_timeline"]


@dataclass
class StepTimeline:
    """The in-backward step's memory at every point of a traced forward + backward, for one optimizer.

    Attributes:
        total: bytes at every timeline point (state and update temporaries included).
        peak_index: the point of the peak.
        temporaries_at_peak: the update temporaries counted at that point (0 off an update).
    """

    total: np.ndarray
    peak_index: int
    temporaries_at_peak: int


def step_timeline(
    report: MemoryReport, shapes: dict[str, torch.Tensor], updates: ParamUpdates, state_bytes: int
) -> StepTimeline:
    """The in-backward step's timeline from a ``consume_grads`` trace (``report.marks``: name -> update point).

    Args:
        report: the tracker's report of the trace.
        shapes: parameter name (as ``named_parameters`` gives it) -> the parameter (its shape and dtype).
        updates: the optimizer's per-parameter updates.
        state_bytes: the optimizer state, resident throughout.
    """
    total = report.timeline_total.astype(np.int64) + state_bytes
    extra = np.zeros_like(total)
    for name, point in report.marks:
        p = shapes.get(name)
        if p is not None:
            extra[point] = max(extra[point], updates.temporaries.get(param_key(p), 0))
    total = total + extra
    at = int(np.argmax(total))
    return StepTimeline(total, at, int(extra[at]))


def timeline_curve(b1: int, t1: StepTimeline, b2: int, t2: StepTimeline) -> PeakCurve:
    """The step's peak as a function of the batch size (exact when the two traces have the same points)."""
    return PeakCurve(b1, t1.total, b2, t2.total)


@dataclass
class ConsumedRemat:
    """A remat schedule of the step with its gradients consumed by updates, at one budget.

    Attributes:
        memory: bytes beyond the graph's inputs after every event of the schedule.
        updates: (event index, parameter) of every update event.
        grads: bytes of gradients live after every event.
        overhead: compute of the schedule relative to the step without recomputation.
    """

    memory: np.ndarray
    updates: list[tuple[int, torch.Tensor]]
    grads: np.ndarray
    overhead: float

    def peak(self, updates: ParamUpdates) -> tuple[int, int]:
        """``(peak beyond inputs, gradients live there)`` with ``updates``' temporaries at the update events."""
        extra = np.zeros_like(self.memory)
        for i, p in self.updates:
            extra[i] = max(extra[i], updates.temporaries.get(param_key(p), 0))
        total = self.memory + extra
        at = int(np.argmax(total)) if len(total) else 0
        return int(total[at]), int(self.grads[at])


def consumed_remat_plans(
    captured: Any,
    net: nn.Module,
    budgets: Sequence[float],
    method: str,
    notes: list[str],
    say: Callable[[str], None],
) -> dict[float, ConsumedRemat]:
    """budget -> the schedule of ``captured`` with every parameter's gradient consumed, for each feasible budget."""
    from memfit import remat as _remat
    from memfit.remat.eager.capture import module_tensors
    from memfit.remat.eager.updates import sink_gradients

    consumed = sink_gradients(captured, captured.param_names)
    graph = consumed.graph
    inputs = graph.input_bytes
    base = consumed.solve(None, "noremat")
    base_sim = base.simulate()
    noninput = base_sim.peak - inputs
    names = [consumed.updates[v] for v in sorted(consumed.updates)]
    tensor_of = dict(zip(names, module_tensors(net, names), strict=True))
    grad_ids = {captured.output_ids[k] for k in captured.grad_outputs.values()}
    plans: dict[float, ConsumedRemat] = {}
    for b in budgets:
        say(f"solving remat at {b:.0%} with the step in the backward")
        try:
            sched = consumed.solve(inputs + int(b * noninput), method)
        except _remat.InfeasibleBudget as exc:
            notes.append(
                f"remat {b:.0%}, step in backward: infeasible ({method} reaches "
                f"{format_bytes(exc.min_peak - inputs)} beyond inputs at best, "
                f"{(exc.min_peak - inputs) / max(noninput, 1):.0%} of no remat in backward)"
            )
            continue
        sim = sched.simulate()
        live: set[int] = set()
        grads = np.zeros(len(sched.events), dtype=np.int64)
        held = 0
        upd: list[tuple[int, torch.Tensor]] = []
        for i, (kind, v) in enumerate(sched.events):
            if v in grad_ids:
                if kind == "compute" and v not in live:
                    live.add(v)
                    held += graph.nbytes(v)
                elif kind == "free" and v in live:
                    live.discard(v)
                    held -= graph.nbytes(v)
            grads[i] = held
            if kind == "compute" and v in consumed.updates:
                upd.append((i, tensor_of[consumed.updates[v]]))
        plans[b] = ConsumedRemat(
            memory=np.asarray(sim.memory, dtype=np.int64) - inputs,
            updates=upd,
            grads=grads,
            overhead=sim.cost / base_sim.cost if base_sim.cost else 1.0,
        )
    return plans


def sliced_consumed_plans(
    captured: Any,
    full_params: Sequence[torch.Tensor],
    budgets: Sequence[float],
    method: str,
    full_noninput: int,
    further_blocks: int,
    notes: list[str],
) -> dict[float, ConsumedRemat]:
    """In-backward remat of a deep GPT from its slice, by the rule of the ordinary rows (``_sliced_plans``).

    Peak beyond inputs = budget x the full model's in-backward no-remat memory beyond inputs (``full_noninput``),
    feasible above the slice's least memory with its gradients consumed + ``further_blocks`` (one block input per
    further block); the overhead is the slice's at the same fraction (or at its least memory). The update
    temporaries of the largest parameter are counted at the peak (an upper bound: where the updates fall in the
    full model's schedule is not known).

    Args:
        captured: the slice's captured step.
        full_params: the full model's parameters (their shapes give the update temporaries).
        budgets: fractions of ``full_noninput``.
        method: the remat solver.
        full_noninput: bytes beyond inputs of the full model's in-backward step without recomputation.
        further_blocks: bytes the blocks beyond the slice add to the least memory.
        notes: infeasible budgets are noted here.
    """
    from memfit.remat.eager.updates import sink_gradients

    consumed = sink_gradients(captured, captured.param_names)
    sliced = slice_budgets(
        consumed.solve, consumed.graph.input_bytes, full_noninput, further_blocks, budgets, method, notes,
        ", step in backward",
    )  # fmt: skip
    return {
        b: ConsumedRemat(
            memory=np.array([target], dtype=np.int64),
            updates=[(0, p) for p in full_params],  # every update may fall at the peak
            grads=np.zeros(1, dtype=np.int64),
            overhead=overhead,
        )
        for b, (target, overhead) in sliced.items()
    }
