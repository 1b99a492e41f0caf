"""Gradients consumed inside the schedule: an ``update`` sink per parameter instead of a gradient output.

A parameter with a post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``) marked by
:func:`consumes_gradient` -- :func:`memfit.optim.step_in_backward` registers one -- has its gradient consumed as
soon as it is final: the hook runs the optimizer's update for that parameter and frees the gradient.
:class:`~memfit.remat.eager.step.RematStep` runs that parameter's hooks inside the schedule, as ``loss.backward()``
does, and lets the solver know (hooks that do not consume the gradient, such as ``memfit.memory.track``'s, change
nothing: they are not called, as before):

- :func:`sink_gradients` rebuilds the captured :class:`Graph` with the gradient no longer an ``output`` (held to
  the end) but read by a 0-byte, non-recomputable ``update`` node that *is* an output. Every schedule then
  computes the update once, and the gradient is transient: the solvers count it only while it lives.
- the solvers see the same values renumbered with each update right after its gradient and the last reader of its
  parameter (several solvers take the id order as the topological order; an update appended at the end would hold
  every gradient to the end of their baseline); :meth:`ConsumedGraph.solve` maps the schedule back;
- :func:`place_updates` moves each update of a solved schedule to the earliest point where it is correct: right
  after its gradient is computed, but never before the last op that reads the parameter (the update writes the
  parameter in place; a recomputation that read it afterwards would see the new values). The gradient's free
  moves up with it when nothing else reads the gradient in between.

The lowering (:mod:`memfit.remat.eager.lower`) turns each update event into a call of the step's
``on_gradient(name, grad)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Event, Schedule
from memfit.remat.eager.capture import CapturedStep

__all__ = ["ConsumedGraph", "consumes_gradient", "is_consuming", "place_updates", "sink_gradients"]

_H = TypeVar("_H", bound=Callable[..., Any])
_MARK = "_memfit_consumes_gradient"


def consumes_gradient(hook: _H) -> _H:
    """Mark a post-accumulate-grad hook as one that consumes the gradient (uses it, then sets ``p.grad = None``).

    Returns:
        ``hook`` itself (a function or any callable with a ``__dict__``), marked.
    """
    setattr(hook, _MARK, True)
    return hook


def is_consuming(hook: Any) -> bool:
    """Whether ``hook`` was marked by :func:`consumes_gradient`."""
    return bool(getattr(hook, _MARK, False))


@dataclass
class ConsumedGraph:
    """A captured step's graph with some gradients consumed by update nodes.

    Attributes:
        graph: the captured graph's nodes (same ids) with the update nodes appended: what the lowering runs.
        updates: update node id -> parameter name.
        params: update node id -> the parameter's input node id.
        ordered: the same nodes renumbered so that each update directly follows its gradient and its parameter's
            last reader: what the solvers see.
        to_graph: ``ordered`` id -> ``graph`` id.
    """

    graph: Graph
    updates: dict[int, str]
    params: dict[int, int]
    ordered: Graph
    to_graph: list[int]

    def solve(self, budget: int | str | None, method: str) -> Schedule:
        """A schedule of :attr:`graph`: solved on :attr:`ordered`, mapped back, updates placed."""
        from memfit.remat.core import solve

        s = solve(self.ordered, budget, method=method)  # type: ignore[arg-type]
        events: list[Event] = [(kind, self.to_graph[v]) for kind, v in s.events]
        mapped = Schedule(self.graph, events, method=s.method, budget=s.budget)
        mapped.info = dict(s.info)
        return place_updates(mapped, self.params)


def sink_gradients(captured: CapturedStep, names: Iterable[str]) -> ConsumedGraph:
    """``captured.graph`` with the gradients of the parameters ``names`` consumed by update nodes.

    Args:
        captured: the captured step.
        names: parameter names (as in ``captured.param_names``) whose gradients are consumed in the schedule;
            names without a gradient output are ignored.

    Returns:
        The :class:`ConsumedGraph`.
    """
    g = captured.graph
    sunk = {n: captured.grad_outputs[n] for n in names if n in captured.grad_outputs}
    sunk_positions = set(sunk.values())
    outputs: set[int] = set()
    returned: set[int] = set()  # what the step's outputs hold resident, sunk or not
    for k, gid in enumerate(captured.output_ids):
        ref = captured.refs[gid]
        held = {gid} if ref is None or ref.view_of is None else {gid, ref.view_of}  # a view keeps its base
        returned |= held
        if k not in sunk_positions:
            outputs |= held
    # graph outputs that are not among the step's returned values stay outputs (the generator state after the
    # last random op, which the lowering hands back so that the step leaves the RNG where eager does)
    outputs |= {v for v in range(len(g)) if g.is_output(v) and v not in returned}
    new = Graph()
    for v in range(len(g)):
        got = new.add(
            g.name(v),
            g.nbytes(v),
            cost=g.cost(v),
            deps=g.deps(v),
            input=g.is_input(v),
            output=v in outputs,
            recomputable=g.is_recomputable(v),
        )
        assert got == v
    param_gid = dict(zip(captured.param_names, captured.placeholder_ids, strict=False))
    updates: dict[int, str] = {}
    params: dict[int, int] = {}
    for name, k in sorted(sunk.items(), key=lambda item: item[1]):
        grad = captured.output_ids[k]
        ref = captured.refs[grad]
        deps = [grad] if ref is None or ref.view_of is None else [grad, ref.view_of]
        s = new.add(f"update[{name}]", 0, cost=0.0, deps=deps, output=True, recomputable=False)
        updates[s] = name
        params[s] = param_gid[name]
    # the solvers' order: each update right after the later of its gradient and the last reader of its parameter
    last_read: dict[int, int] = {}
    for v in range(len(g)):
        for d in g.deps(v):
            last_read[d] = v
    after: dict[int, list[int]] = {}
    for s, p in params.items():
        after.setdefault(max([*new.deps(s), last_read.get(p, -1)]), []).append(s)
    order = [v for u in range(len(g)) for v in (u, *after.get(u, ()))]
    new_id = {v: i for i, v in enumerate(order)}
    ordered = Graph()
    for v in order:
        ordered.add(
            new.name(v),
            new.nbytes(v),
            cost=new.cost(v),
            deps=[new_id[d] for d in new.deps(v)],
            input=new.is_input(v),
            output=new.is_output(v),
            recomputable=new.is_recomputable(v),
        )
    return ConsumedGraph(new, updates, params, ordered, order)


def place_updates(schedule: Schedule, params: dict[int, int]) -> Schedule:
    """Move each update event right after its gradient is computed and after the last reader of its parameter.

    Args:
        schedule: a valid schedule of a graph made by :func:`sink_gradients`.
        params: update node id -> the parameter's input node id.

    Returns:
        The schedule with the updates moved (validated).

    Raises:
        ScheduleError: the moved schedule is invalid (a gradient freed and recomputed while its update waits
            for a reader of the parameter; no solver of memfit produces this).
    """
    g = schedule.graph
    events = list(schedule.events)
    position = {v: i for i, (kind, v) in enumerate(events) if kind == "compute" and v in params}
    last_read: dict[int, int] = {}
    wanted = set(params.values())
    for i, (kind, v) in enumerate(events):
        if kind == "compute" and v not in params:
            for d in g.deps(v):
                if d in wanted:
                    last_read[d] = i
    anchored: dict[int, list[Event]] = {}  # event index -> events to insert right after it
    dropped: set[int] = set()
    for s, param in params.items():
        i = position[s]
        deps = g.deps(s)
        made = [max(j for j in range(i) if events[j] == ("compute", d)) for d in deps]
        target = max([*made, last_read.get(param, -1)])
        moved: list[Event] = [("compute", s)]
        dropped.add(i)
        for d in deps:
            f = next((j for j in range(i + 1, len(events)) if events[j] == ("free", d)), None)
            if f is None or f in dropped:
                continue
            lo, hi = min(target, f), max(target, f)
            touched = any(
                kind == "compute" and (v == d or d in g.deps(v)) and v != s
                for kind, v in (events[j] for j in range(lo + 1, hi))
            )
            if f < target or not touched:  # before the new update it must move; after it, it may move up
                moved.append(("free", d))
                dropped.add(f)
        anchored.setdefault(target, []).extend(moved)
    out: list[Event] = []
    for j, event in enumerate(events):
        if j not in dropped:
            out.append(event)
        out.extend(anchored.get(j, ()))
    placed = Schedule(g, out, method=schedule.method, budget=schedule.budget)
    placed.info = dict(schedule.info)
    placed.simulate()  # validates
    return placed
