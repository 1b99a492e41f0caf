"""Lower a :class:`~memfit.remat.Schedule` of a captured step to a runnable ``torch.fx.GraphModule``.

Each ``compute v`` event becomes a fresh copy of v's op, reading the *current* copies of its arguments, so a
value computed twice is two fx nodes. fx's code generator drops every variable right after its last use, so a
value lives no longer than the schedule keeps it (often shorter: the schedule may free later than needed).

Three details keep the measured memory at or below the schedule's prediction:

- **Views.** A view (0 bytes in the graph) keeps its base's storage alive. When the schedule frees a base, the
  lowering forgets every view of it; a later user of such a view re-creates it from the base's current copy
  (which the schedule keeps resident, since users of a view also depend on its base).
- **Multi-output ops.** Outputs of one op call that the schedule computes back to back come from a single
  call. A random op's outputs always come from its single call (they are not recomputable).
- **Random ops** draw from a seed derived per op (``seed + position``), so the masks do not depend on the order in
  which a schedule happens to run independent random ops: every schedule of the same step draws the same masks.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memfit.remat.core.schedule import Schedule
from memfit.remat.eager.capture import CapturedStep, _key

__all__ = ["lower"]


def _seeded(target: Callable[..., Any], position: int) -> Callable[..., Any]:
    """``target`` run with the global RNG seeded from ``seed + position``, restoring the RNG afterwards."""

    def random_op(seed: int, *args: Any, **kwargs: Any) -> Any:
        devices = sorted(
            {
                a.device.index or 0
                for a in pytree.tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor) and a.device.type == "cuda"
            }
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + position)
            return target(*args, **kwargs)

    random_op.__name__ = f"random_{position}_{getattr(target, '__name__', 'op').replace('.', '_')}"
    return random_op


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
        ``gm(*params, *buffers, *flat_batch[, seed][, on_gradient]) -> outputs`` in the captured graph's output
        order; ``seed`` (an int) is an argument only when the step has random ops, ``on_gradient`` only with
        ``updates``.
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
    seed = new.placeholder("rng_seed") if captured.n_random else None
    on_gradient = new.placeholder("on_gradient") if updates else None

    views_of: dict[int, list[int]] = {}
    siblings: dict[fx.Node, list[int]] = {}
    for gid, ref in enumerate(refs):
        if ref is None:
            continue
        if ref.view_of is not None:
            views_of.setdefault(ref.view_of, []).append(gid)
        if ref.index is not None:
            siblings.setdefault(ref.node, []).append(gid)
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
        ref_random = next((refs[g].random for g in _ids_of(node)), None)  # type: ignore[union-attr]
        if ref_random is None:
            out = new.call_function(node.target, args, kwargs)  # type: ignore[arg-type]
        else:
            if node not in wrappers:
                wrappers[node] = _seeded(node.target, ref_random)  # type: ignore[arg-type]
            out = new.call_function(wrappers[node], (seed, *args), kwargs)
        out.meta = dict(node.meta)
        return out

    def _ids_of(node: fx.Node) -> list[int]:
        return siblings.get(node) or [captured.id_of[node]]

    def emit(gid: int, at: int = -1) -> None:
        ref = refs[gid]
        assert ref is not None
        if ref.index is None:
            env[gid] = call(ref.node)
            return
        if gid in pending:
            env[gid] = pending.pop(gid)
            return
        out = call(ref.node)
        env[gid] = new.call_function(operator.getitem, (out, ref.index))
        for sib in _siblings_from_same_call(gid, at):
            pending[sib] = new.call_function(operator.getitem, (out, refs[sib].index))  # type: ignore[union-attr]

    def _siblings_from_same_call(gid: int, at: int) -> list[int]:
        ref = refs[gid]
        assert ref is not None
        group = [s for s in siblings[ref.node] if s != gid]
        if ref.random is not None:  # one call for all outputs of a random op
            later = {v for kind, v in events[at + 1 :] if kind == "compute"} if at >= 0 else set()
            return [s for s in group if s in later]
        taken = []
        for kind, v in (
            events[at + 1 :] if at >= 0 else []
        ):  # the run of sibling computes right after this one
            if kind == "free":
                continue
            if v in group and v not in env:
                taken.append(v)
                continue
            break
        return taken

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
    new.output(tuple(None if k in consumed else current(g) for k, g in enumerate(captured.output_ids)))
    new.lint()
    return fx.GraphModule(captured.gm, new)
