"""``memfit.remat.compile``: a model's training step, rematerialized to fit a memory budget.

    step = memfit.remat.compile(model, loss_fn, example_batch, budget=0.5)
    loss = step(batch)        # forward + backward under the schedule; gradients accumulate into p.grad
    optimizer.step()

The step is captured once per batch shape (:mod:`memfit.remat.eager.capture`), scheduled by a solver of
:func:`memfit.remat.solve` under the budget, and lowered to an fx module (:mod:`memfit.remat.eager.lower`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx

from memfit import _compat
from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solve import Method
from memfit.remat.eager.capture import (
    CapturedStep,
    CostModel,
    capture,
    flatten_batch,
    generator,
    module_tensors,
)
from memfit.remat.eager.costs import Rates
from memfit.remat.eager.lower import call_cost, lower
from memfit.remat.eager.updates import ConsumedGraph, is_consuming, sink_gradients

__all__ = ["RematPlan", "RematStep", "compile"]


@dataclass(frozen=True)
class RematPlan:
    """What the solver decided for one batch shape, in the terms a user budgets in.

    All byte figures are *non-input* memory: everything but the parameters, buffers and the batch (which are
    resident anyway). Gradients are included (they are outputs of the step).

    Attributes:
        method: the solver.
        budget_bytes: the budget asked for (``None``: no recomputation).
        peak_bytes: the schedule's predicted peak.
        noremat_peak_bytes: the predicted peak of the step without recomputation.
        input_bytes: parameters + buffers + batch.
        cost_overhead: predicted compute cost of the schedule / cost without recomputation.
        recomputed_nodes: number of extra computes (values computed more than once).
        nodes: values in the captured graph.
        capture_seconds: time to trace the step.
        solve_seconds: time the solver took.
    """

    method: str
    budget_bytes: int | None
    peak_bytes: int
    noremat_peak_bytes: int
    input_bytes: int
    cost_overhead: float
    recomputed_nodes: int
    nodes: int
    capture_seconds: float
    solve_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> str:
        """A few readable lines."""
        mib = 2.0**20
        budget = (
            "none (no recomputation)" if self.budget_bytes is None else f"{self.budget_bytes / mib:,.2f} MiB"
        )
        ratio = self.peak_bytes / self.noremat_peak_bytes if self.noremat_peak_bytes else 1.0
        return "\n".join(
            [
                f"memfit.remat plan ({self.method}, {self.nodes} values captured in {self.capture_seconds:.2f} s, "
                f"solved in {self.solve_seconds:.2f} s)",
                f"  budget (non-input)   {budget}",
                f"  predicted peak       {self.peak_bytes / mib:,.2f} MiB  ({ratio:.0%} of no-remat "
                f"{self.noremat_peak_bytes / mib:,.2f} MiB)",
                f"  inputs (resident)    {self.input_bytes / mib:,.2f} MiB",
                f"  predicted compute    {self.cost_overhead:.3f}x no-remat, {self.recomputed_nodes} recomputes",
            ]
        )


@dataclass
class _Compiled:
    captured: CapturedStep
    schedule: Schedule
    gm: fx.GraphModule
    plan: RematPlan
    updates: dict[int, str]  # update node id -> parameter name (gradients consumed in the schedule)


def _shape_key(flat: list[torch.Tensor], spec: Any) -> tuple[Any, ...]:
    return (str(spec), *((tuple(t.shape), t.dtype, t.device) for t in flat))


class RematStep:
    """A training step that runs forward and backward under a rematerialization schedule.

    Call it with a batch: it returns the loss (detached) and accumulates gradients into ``p.grad`` exactly like
    ``loss.backward()``; buffers the forward updates (BatchNorm running statistics) are updated once. A batch of a
    new shape is captured and scheduled anew (cached per shape).

    A parameter with a post-accumulate-grad hook that consumes its gradient (marked by
    :func:`memfit.remat.eager.updates.consumes_gradient`, as :func:`memfit.optim.step_in_backward`'s is) has its
    hooks run as under ``loss.backward()``: right after its gradient is computed and added into ``p.grad``, inside
    the schedule; the solver counts that gradient as transient, not as held to the end.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        *,
        budget: int | float | str | None,
        method: Method,
        cost: CostModel,
        rates: Rates | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.budget = budget
        self.method = method
        self.cost = cost
        self.rates = rates
        self._cache: dict[tuple[Any, ...], _Compiled] = {}
        # captures depend on the model and the batch shape only: steps made by with_budget share them
        self._captures: dict[tuple[Any, ...], CapturedStep] = {}
        self._last: _Compiled | None = None

    def with_budget(self, budget: int | float | str | None, method: Method | None = None) -> RematStep:
        """A step for the same model and loss under another budget (or method), reusing this step's captures.

        Capturing is the slow part of :func:`compile`; a sweep over budgets captures each batch shape once.
        """
        if budget is not None:
            _budget_bytes(budget, 1)
        other = RematStep(
            self.model,
            self.loss_fn,
            budget=budget,
            method=method or self.method,
            cost=self.cost,
            rates=self.rates,
        )
        other._captures = self._captures
        return other

    @property
    def plan(self) -> RematPlan:
        """The plan of the most recently compiled batch shape."""
        if self._last is None:
            raise RuntimeError("no batch shape has been compiled yet")
        return self._last.plan

    @property
    def schedule(self) -> Schedule:
        """The schedule of the most recently compiled batch shape."""
        if self._last is None:
            raise RuntimeError("no batch shape has been compiled yet")
        return self._last.schedule

    @property
    def captured(self) -> CapturedStep:
        """The captured graph of the most recently compiled batch shape."""
        if self._last is None:
            raise RuntimeError("no batch shape has been compiled yet")
        return self._last.captured

    def report(self) -> str:
        """The plan as text (also printed)."""
        text = self.plan.report()
        print(text)
        return text

    def prepare(self, batch: Any) -> RematPlan:
        """Capture and schedule for ``batch``'s shape without running a step."""
        flat, spec = flatten_batch(batch)
        return self._compiled(flat, spec).plan

    def _hooked(self) -> frozenset[str]:
        """Graph names of the parameters with a hook that consumes their gradient."""
        return frozenset(
            "model." + n
            for n, p in self.model.named_parameters(remove_duplicate=False)
            if any(is_consuming(h) for h in _compat.post_accumulate_grad_hooks(p))
        )

    def _compiled(self, flat: list[torch.Tensor], spec: Any) -> _Compiled:
        hooked = self._hooked()
        key = (*_shape_key(flat, spec), hooked)
        if key not in self._cache:
            self._cache[key] = self._compile(flat, spec, hooked)
        self._last = self._cache[key]
        return self._last

    def _compile(
        self, flat: list[torch.Tensor], spec: Any, hooked: frozenset[str] = frozenset()
    ) -> _Compiled:
        from memfit.remat.core import solve

        key = _shape_key(flat, spec)
        if key not in self._captures:
            batch = torch.utils._pytree.tree_unflatten(flat, spec)
            self._captures[key] = capture(self.model, self.loss_fn, batch, cost=self.cost, rates=self.rates)
        captured = self._captures[key]
        graph = captured.graph
        updates: dict[int, str] = {}
        consumed: ConsumedGraph | None = None
        if hooked & set(captured.grad_outputs):
            consumed = sink_gradients(captured, sorted(hooked))
            graph, updates = consumed.graph, consumed.updates
        inputs = graph.input_bytes
        base = consumed.solve(None, "noremat") if consumed else solve(graph, None, method="noremat")
        base_sim = base.simulate()
        t0 = time.perf_counter()
        if self.budget is None:
            schedule, budget_bytes = base, None
        else:
            budget_bytes = _budget_bytes(self.budget, base_sim.peak - inputs)
            try:
                target = (
                    "min" if self.budget == "min" else inputs + budget_bytes
                )  # "min": the least peak reached
                if consumed is not None:
                    schedule = consumed.solve(target, self.method)
                else:
                    schedule = solve(graph, target, method=self.method)  # type: ignore[arg-type]
                if self.budget == "min":
                    budget_bytes = schedule.simulate().peak - inputs
            except InfeasibleBudget as exc:
                raise _infeasible(exc, captured, graph, base_sim.peak) from None
        solve_seconds = time.perf_counter() - t0
        sim = schedule.simulate()
        gm = lower(captured, schedule, updates)
        plan = RematPlan(
            method="noremat" if self.budget is None else self.method,
            budget_bytes=budget_bytes,
            peak_bytes=sim.peak - inputs,
            noremat_peak_bytes=base_sim.peak - inputs,
            input_bytes=inputs,
            cost_overhead=_overhead(captured, schedule, base),
            recomputed_nodes=sim.computes - base_sim.computes,
            nodes=len(graph),
            capture_seconds=captured.capture_seconds,
            solve_seconds=solve_seconds,
        )
        return _Compiled(captured, schedule, gm, plan, updates)

    def __call__(self, batch: Any) -> torch.Tensor:
        flat, spec = flatten_batch(batch)
        compiled = self._compiled(flat, spec)
        captured = compiled.captured
        names = [*captured.param_names, *captured.buffer_names]
        tensors = module_tensors(self.model, names)
        by_name = dict(zip(names, tensors, strict=True))  # graph names ("model." + module path) -> tensor
        args: list[Any] = [*tensors, *flat]
        if captured.rng_device is not None:  # random ops draw from the generator as eager autograd's would
            args.append(generator(captured.rng_device).get_state())
        if compiled.updates:

            def on_gradient(name: str, g: torch.Tensor) -> None:
                p = by_name[name]
                _accumulate(p, g)
                for hook in _compat.post_accumulate_grad_hooks(p):  # as autograd's AccumulateGrad does
                    hook(p)

            args.append(on_gradient)
        with torch.no_grad():
            outs = compiled.gm(*args)
        del args
        if captured.rng_device is not None:
            generator(captured.rng_device).set_state(outs[-1])
        for name, i in captured.grad_outputs.items():
            if outs[i] is not None:  # None: consumed inside the schedule
                _accumulate(by_name[name], outs[i])
        with torch.no_grad():
            for name, i in captured.buffer_outputs.items():
                by_name[name].copy_(outs[i])
        loss: torch.Tensor = outs[captured.loss_index]
        return loss.detach()


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    """Add ``g`` into ``p.grad`` as autograd does (``p.grad`` set when it is ``None``)."""
    if g._base is not None and g._base.numel() != g.numel():
        g = g.clone()  # do not pin a larger buffer through a view
    if p.grad is None:
        p.grad = g if g.stride() == p.stride() else g.clone(memory_format=torch.contiguous_format)
    else:
        p.grad.add_(g)


def _overhead(captured: CapturedStep, schedule: Schedule, base: Schedule) -> float:
    """Compute cost as run (one cost per op call) relative to the step without recomputation."""
    cost, base_cost = call_cost(captured, schedule), call_cost(captured, base)
    return cost / base_cost if base_cost > 0 else 1.0


def _infeasible(
    exc: InfeasibleBudget, captured: CapturedStep, graph: Graph, noremat_peak: int
) -> InfeasibleBudget:
    """The solver's error in the terms :func:`compile` budgets in: bytes beyond parameters, buffers and batch."""
    inputs = graph.input_bytes
    n_par, n_buf = len(captured.param_names), len(captured.buffer_names)
    ids = captured.placeholder_ids
    par = sum(graph.nbytes(v) for v in ids[:n_par])
    buf = sum(graph.nbytes(v) for v in ids[n_par : n_par + n_buf])
    # a gradient is as large as its parameter (its graph value may be a 0-byte view of a larger one)
    grads = sum(
        graph.nbytes(ids[k]) for k, name in enumerate(captured.param_names) if name in captured.grad_outputs
    )
    return InfeasibleBudget(
        budget=max(exc.budget - inputs, 0),
        min_peak=max(exc.min_peak_bytes - inputs, 0),
        method=exc.method,
        reference_bytes=noremat_peak - inputs,
        fixed={
            "gradients (inside the budget)": grads,
            "parameters, buffers and batch (outside it)": inputs,
            "of which parameters": par,
            "buffers": buf,
            "batch": max(inputs - par - buf, 0),
        },
        counted="memory beyond parameters, buffers and batch",
    )


def _budget_bytes(budget: int | float | str, noremat_non_input: int) -> int:
    if budget == "min":
        return 0  # the solver finds the least peak
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(
            f'budget must be bytes (int), a fraction in (0, 1] (float), "min" or None, got {budget!r}'
        )
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
        return int(budget * noremat_non_input)
    if budget <= 0:
        raise ValueError(f"a byte budget must be positive, got {budget}")
    return budget


def compile(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    example_batch: Any,
    *,
    budget: int | float | str | None = None,
    method: Method = "budget",
    cost: CostModel = "flops",
    rates: Rates | None = None,
) -> RematStep:
    """Capture ``model``'s training step and schedule it to fit ``budget``.

    Args:
        model: the module to train.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; ``batch`` is passed exactly as given to the step.
        example_batch: fixes shapes and dtypes (a tensor, or a tuple/list/dict of tensors).
        budget: peak bytes beyond the parameters, buffers and batch (an int), or a float in (0, 1]: that
            fraction of the no-remat step's peak of such memory; ``"min"``: the least peak the solver reaches.
            ``None``: no recomputation (the baseline).
        method: a solver of :func:`memfit.remat.solve` (``"budget"``, ``"twremat"``, ``"checkpoint"``, ...).
        cost: ``"flops"`` (estimated from FLOPs and bytes moved) or ``"profile"`` (measured per op).
        rates: the device speeds ``"flops"`` prices ops at (default: measured once per process by
            :func:`memfit.remat.calibrate`); pass one ``Rates`` to every process for the same plan in each.

    Returns:
        The :class:`RematStep`; it is compiled for ``example_batch`` right away, so errors surface here.

    Raises:
        InfeasibleBudget: the budget is below what the step needs; ``min_peak_bytes`` / ``min_fraction`` give the
            smallest feasible budget (non-input bytes, and as a fraction); the message says what recomputation
            cannot reduce (gradients, parameters, batch).
        UnsupportedGraph: the step cannot be captured (the message names the op or the cause).
    """
    if budget is not None:
        _budget_bytes(budget, 1)  # type and range errors before the (slow) capture
    step = RematStep(model, loss_fn, budget=budget, method=method, cost=cost, rates=rates)
    step.prepare(example_batch)
    return step
