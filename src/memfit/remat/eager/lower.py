"""Lower a :class:`~memfit.remat.Schedule` of a captured step to a runnable ``torch.fx.GraphModule``.

Each ``compute v`` event becomes a fresh copy of v's op, reading the *current* copies of its arguments, so a
value computed twice is two fx nodes. fx's code generator drops every variable right after its last use, so a
value lives no longer than the schedule keeps it (often shorter: the schedule may free later than needed).

Three details keep the measured memory at or below the schedule's prediction:

- **Views.** A view (0 bytes in the graph) keeps its base's storage alive. When the schedule frees a base, the
  lowering forgets every view of it; a later user of such a view re-creates it from the base's current copy
  (which the schedule keeps resident, since users of a view also depend on its base).
- **Multi-output ops.** Outputs of one op call that the schedule computes back to back come from a single
  call (:func:`call_cost` counts the calls the lowering makes).
- **Random ops** set the generator to the state the capture gave them (``rng_state`` for the first, the state the
  previous random op left for the others) and return the state they leave: a recomputation draws the same mask,
  and the masks are eager autograd's at the same generator state, whatever the schedule.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from memfit.remat.core.schedule import Schedule
from memfit.remat.eager.capture import CapturedStep, _key, generator

__all__ = ["call_cost", "lower"]


def _seeded(target: Callable[..., Any], position: int, device: torch.device) -> Callable[..., Any]:
    """``random_op(state, *args) -> (target(*args), state after)``, drawing from ``device``'s default generator
    set to ``state``."""

    def random_op(state: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        gen = generator(device)
        gen.set_state(state)
        out = target(*args, **kwargs)
        return out, gen.get_state()

    random_op.__name__ = f"random_{position}_{getattr(target, '__name__', 'op').replace('.', '_')}"
    return random_op


def _groups(captured: CapturedStep) -> dict[fx.Node, list[int]]:
    """The values one call of a multi-output or random op makes (a random op's generator state included)."""
    groups: dict[fx.Node, list[int]] = {}
    for gid, ref in enumerate(captured.refs):
        if ref is not None and (ref.index is not None or ref.random is not None):
            groups.setdefault(ref.node, []).append(gid)
    return groups


def _shared_calls(captured: CapturedStep, events: Sequence[tuple[str, int]]) -> dict[int, list[int]]:
    """Compute event index -> the later compute events that the same op call serves: the run of sibling computes
    right after it (frees in between allowed). Events served by an earlier call are not keys."""
    refs = captured.refs
    groups = _groups(captured)
    calls: dict[int, list[int]] = {}
    served: set[int] = set()
    for i, (kind, v) in enumerate(events):
        if kind != "compute" or i in served:
            continue
        ref = refs[v] if v < len(refs) else None
        taken: list[int] = []
        if ref is not None and ref.node in groups:
            group = set(groups[ref.node]) - {v}
            for j in range(i + 1, len(events)):
                k, w = events[j]
                if k == "free":
                    continue
                if w not in group:
                    break
                group.discard(w)
                taken.append(j)
        calls[i] = taken
        served.update(taken)
    return calls


def call_cost(captured: CapturedStep, schedule: Schedule) -> float:
    """The schedule's compute cost as the lowering runs it: one op cost per op call (sibling outputs computed back
    to back share one call), where ``Schedule.simulate`` charges every computed value."""
    graph = schedule.graph
    events = list(schedule.events)
    return math.fsum(graph.cost(events[i][1]) for i in _shared_calls(captured, events))


def _run_update(on_gradient: Callable[[str, torch.Tensor], None], name: str, grad: torch.Tensor) -> None:
    on_gradient(name, grad)


def lower(
    captured: CapturedStep, schedule: Schedule, updates: Mapping[int, str] | None = None
) -> fx.GraphModule:
    """Build the fx module that runs ``schedule``.

    Args:
        captured: the captured step whose graph was scheduled.
        schedule: a valid schedule of ``captured.graph``, or of the graph
            :func:`memfit.remat.eager.updates.sink_gradients` made from it.
        updates: update node id -> parameter name (from ``sink_gradients``): each update event calls
            ``on_gradient(name, grad)``, and that gradient's output is ``None``.

    Returns:
        ``gm(*params, *buffers, *flat_batch[, rng_state][, on_gradient]) -> outputs`` in the captured graph's output
        order, then (with random ops) the generator's state after the last one; ``rng_state`` (the generator
        state of ``captured.rng_device`` to start from) is an argument only when the step has random ops,
        ``on_gradient`` only with ``updates``.
    """
    updates = updates or {}
    refs = captured.refs
    events = list(schedule.events)
    new = fx.Graph()
    env: dict[int, fx.Node] = {}
    pending: dict[int, fx.Node] = {}  # outputs of an op call kept for a sibling's compute event soon after

    for n in captured.gm.graph.nodes:
        if n.op == "placeholder":
            p = new.placeholder(n.name)
            p.meta = dict(n.meta)
            env[captured.id_of[n]] = p
        elif n.op == "get_attr":
            env[captured.id_of[n]] = new.get_attr(str(n.target))
    if captured.rng_input_id is not None:
        env[captured.rng_input_id] = new.placeholder("rng_state")
    on_gradient = new.placeholder("on_gradient") if updates else None

    views_of: dict[int, list[int]] = {}
    for gid, ref in enumerate(refs):
        if ref is not None and ref.view_of is not None:
            views_of.setdefault(ref.view_of, []).append(gid)
    siblings = _groups(captured)
    shared = _shared_calls(captured, events)
    wrappers: dict[fx.Node, Callable[..., Any]] = {}

    def current(gid: int) -> fx.Node:
        if gid in env:
            return env[gid]
        ref = refs[gid]
        if ref is not None and ref.view_of is not None and ref.view_of in env:
            emit(gid)  # a view forgotten when its base was freed: re-create it from the base's current copy
            return env[gid]
        raise RuntimeError(
            f"lowering: {captured.graph.name(gid)} is used but not resident (invalid schedule)"
        )

    def call(node: fx.Node) -> fx.Node:
        def arg(a: fx.Node) -> fx.Node:
            return current(captured.id_of[_key(a)])

        args = fx.map_arg(node.args, arg)
        kwargs = fx.map_arg(node.kwargs, arg)
        position = next((refs[g].random for g in siblings.get(node, ())), None)  # type: ignore[union-attr]
        if position is None:
            out = new.call_function(node.target, args, kwargs)  # type: ignore[arg-type]
        else:
            assert captured.rng_device is not None
            state = current(_state_before(node))
            if node not in wrappers:
                wrappers[node] = _seeded(node.target, position, captured.rng_device)  # type: ignore[arg-type]
            out = new.call_function(wrappers[node], (state, *args), kwargs)
        out.meta = dict(node.meta)
        out.meta["memfit_source"] = node.name  # the captured op this call runs (tests count calls per op)
        return out

    # the generator state random op k starts from: the step's for k = 0, else the one random op k - 1 leaves
    after = {r.random: g for g, r in enumerate(refs) if r is not None and r.rng and r.random is not None}
    states = [captured.rng_input_id, *(after[k] for k in range(len(after)))]

    def _state_before(node: fx.Node) -> int:
        state = states[refs[siblings[node][0]].random]  # type: ignore[union-attr,index]
        assert state is not None
        return state

    def extract(out: fx.Node, gid: int) -> fx.Node:
        ref = refs[gid]
        assert ref is not None
        if ref.random is not None:
            out = new.call_function(operator.getitem, (out, 1 if ref.rng else 0))
            if ref.rng:
                return out
        return out if ref.index is None else new.call_function(operator.getitem, (out, ref.index))

    def emit(gid: int, at: int = -1) -> None:
        ref = refs[gid]
        assert ref is not None
        if gid in pending:
            env[gid] = pending.pop(gid)
            return
        out = call(ref.node)
        env[gid] = extract(out, gid) if ref.node in siblings else out
        for j in shared.get(at, ()):
            pending[events[j][1]] = extract(out, events[j][1])

    for i, (kind, v) in enumerate(events):
        if kind == "compute" and v in updates:
            new.call_function(_run_update, (on_gradient, updates[v], current(schedule.graph.deps(v)[0])))
        elif kind == "compute":
            emit(v, i)
        else:
            env.pop(v, None)
            for w in views_of.get(v, ()):
                env.pop(w, None)
    consumed = {captured.grad_outputs[name] for name in updates.values()}
    outs = [None if k in consumed else current(g) for k, g in enumerate(captured.output_ids)]
    if (
        captured.rng_output_id is not None
    ):  # the generator's state after the last random op, as eager leaves it
        outs.append(current(captured.rng_output_id))
    new.output(tuple(outs))
    new.lint()
    return fx.GraphModule(captured.gm, new)
