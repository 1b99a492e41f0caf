"""What the forward saves: the candidates, their Pareto frontier, and the choice for a budget.

:func:`partition` is the partition step of one compile: torch's own partition first (the reference of a fractional
budget); then the prefixes of the greedy passes of :class:`~memfit.remat.compiled.model._Model` under a few ratios
of matmul to memory cost, and torch's knapsack at a few ``activation_memory_budget`` levels, priced and simulated
by the model, give a frontier of (peak, recompute cost); the cheapest point that fits is written as
checkpoint-policy tags, and torch's partitioner carries it out. :class:`CompiledPlan` is what was decided and what
it predicts.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy

from memfit import _compat
from memfit.remat.compiled.model import _graph_peak, _Model
from memfit.remat.eager.costs import Rates, _calibrate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledPlan:
    """memfit's decision for one compiled graph, and what it predicts.

    Byte figures are the step's memory above what exists before it (parameters, the batch): activations, saved
    values, backward temporaries and the gradients the backward returns, as the fused graphs hold them.

    Attributes:
        budget_bytes: the budget in bytes (``None``: no budget, torch's own choice of saved values is kept).
        predicted_peak_bytes: the predicted peak of the graphs handed to inductor.
        full_peak_bytes: the predicted peak with torch's own partitioner (the reference of a fractional budget).
        min_peak_bytes: the smallest predicted peak this path reaches (each value recomputed at most once).
        saved_bytes: bytes the forward saves for the backward.
        recompute_cost_s: predicted seconds of recomputation added to the backward (fusion-aware costs).
        recomputed_ops: forward ops memfit marked for recomputation.
        feasible: ``False`` when the budget is below ``min_peak_bytes``; the min-peak choice is used then.
        solve_seconds: time spent deciding (inductor's compile time is not included).
        compiled_peak_bytes: the peak of inductor's own buffer plan for these graphs, read from the code it
            generated (fusion and buffer reuse as they really are); ``None`` until both graphs are compiled (the
            backward may compile at the first ``backward()``), and with ``compiler="aot_eager"``. When it is known,
            ``feasible`` says whether it fits the budget.
        refined: the first compile's buffer plan overshot the budget or left more than 3% of it unused, and this
            plan comes from a second compile whose model aim was scaled by the ratio of memfit's prediction to
            inductor's peak.
        rates: the device speeds the costs were computed with (given to :func:`backend`, or calibrated in this
            process); ``None`` without a budget.
        layout_copy_bytes: bytes of the copies of graph inputs (parameters) that inductor's forward saves for the
            backward in their place: its layout optimisation converts convolution weights to channels-last and
            saves the converted copies, held from the forward to their convolution's backward. They are in
            ``compiled_peak_bytes``; no choice of saved values removes them (see docs/remat_compiled.md,
            "Convnets on CPU inductor").
        layout_optimization_off: this plan comes from a refining compile with inductor's layout optimisation turned
            off, because the first compile's plan was over the budget with such copies in it.
    """

    budget_bytes: int | None
    predicted_peak_bytes: int
    full_peak_bytes: int
    min_peak_bytes: int
    saved_bytes: int
    recompute_cost_s: float
    recomputed_ops: int
    feasible: bool
    solve_seconds: float
    compiled_peak_bytes: int | None = None
    refined: bool = False
    rates: Rates | None = None
    layout_copy_bytes: int = 0
    layout_optimization_off: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> str:
        mib = 2**20
        budget = "none" if self.budget_bytes is None else f"{self.budget_bytes / mib:.1f} MiB"
        return (
            f"memfit compiled plan: budget {budget}, predicted peak {self.predicted_peak_bytes / mib:.1f} MiB "
            f"(torch's partitioner {self.full_peak_bytes / mib:.1f} MiB, lowest reachable "
            f"{self.min_peak_bytes / mib:.1f} MiB), saves {self.saved_bytes / mib:.1f} MiB, recomputes "
            f"{self.recomputed_ops} ops (+{self.recompute_cost_s * 1e3:.1f} ms predicted)"
            + (
                ""
                if self.compiled_peak_bytes is None
                else f"; inductor's buffer plan peaks at {self.compiled_peak_bytes / mib:.1f} MiB"
            )
            + (
                f" (with {self.layout_copy_bytes / mib:.1f} MiB of layout copies of parameters saved for the backward)"
                if self.layout_copy_bytes
                else ""
            )
            + (
                "; inductor's layout optimisation turned off (its copies were over budget)"
                if self.layout_optimization_off
                else ""
            )
            + ("" if self.feasible else "; budget infeasible on the compiled path: min-peak plan used")
        )


# Multipliers of the matmul (extern kernel) costs in the greedy passes. The calibrated rates are noisy and the
# ratio of matmul to memory cost orders the greedy's moves; passes under a few ratios reach points (and lowest
# peaks) that one pass misses. Every point is then priced with the calibrated costs.
_COST_SCALES = (1.0, 4.0, 0.25)


# Levels of torch's own ``activation_memory_budget`` whose choices join memfit's candidates (_torch_choices): the
# knob's range at three points. Each costs one call of torch's knapsack partitioner (2.5 s on the benchmark's GPT-2,
# where memfit's frontier dominated torch's choices at 0.8, 0.6, 0.4, 0.3, 0.2 and 0.1, and torch's 0.5 choice
# joined the frontier between two of memfit's points).
_TORCH_LEVELS = (0.8, 0.5, 0.2)


def _default_recompute(model: _Model) -> set[fx.Node]:
    """Views are always recomputed from their saved base (free); every other forward value starts saved."""
    return {n for n in model.candidates() if model.kind[n] == "view"}


def _tag(model: _Model, recompute: set[fx.Node]) -> None:
    """Write the choice as checkpoint-policy tags, which torch's min-cut partitioner obeys."""
    for n in [*model.fw, *model.unclaimed]:
        if n.op != "call_function" or n in model.fixed:
            continue
        if n in recompute or n not in model._fw_set:
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        else:
            n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        n.meta.pop("ac_graph_id", None)  # one region: no boundary saves between checkpoint regions


# A frontier as a memo keeps it: (predicted peak, recompute cost, names of the recomputed nodes) per point.
_Frontier = list[tuple[int, float, frozenset[str]]]


def _fingerprint(model: _Model, num_fwd_outputs: int) -> str:
    """A hash of what the frontier is computed from: every node of the joint graph (its op, arguments and value's
    shape, dtype and strides), the model's bytes and costs (which hold the rates), and the fusion model. Two
    partitions of graphs with equal fingerprints get equal frontiers (torch's knapsack and memfit's passes are
    deterministic)."""
    h = hashlib.sha256(f"{num_fwd_outputs} {model.fused}\n".encode())
    for n in model.nodes:
        val = n.meta.get("val")
        sig = (
            (tuple(val.shape), val.dtype, val.stride())
            if isinstance(val, torch.Tensor)
            else type(val).__name__
        )
        h.update(
            f"{n.format_node()} {sig} {model.bytes[n]} {model.cost.get(n)!r} {n.meta.get('recompute')}\n".encode()
        )
    return h.hexdigest()


def partition(
    gm: fx.GraphModule,
    joint_inputs: Sequence[object],
    min_cut: Any,
    kwargs: dict[str, Any],
    *,
    budget: int | float | None,
    scale: float,
    rates: Rates | None,
    fused: bool,
    memo: dict[str, _Frontier] | None = None,
) -> tuple[CompiledPlan, fx.GraphModule, fx.GraphModule]:
    """The partition step of one compile: memfit's choice of saved values for ``budget``, carried out by torch.

    Args:
        gm: the joint graph AOTAutograd hands its partitioner.
        joint_inputs: its inputs.
        min_cut: torch's min-cut partitioner (``min_cut_rematerialization_partition``).
        kwargs: the partitioner's keyword arguments (``num_fwd_outputs`` among them), passed on to ``min_cut``.
        budget: bytes, a fraction of the peak with torch's own partition, or ``None`` (torch's choice is kept).
        scale: the model's aim as a fraction of the budget (below 1 on a refining compile).
        rates: the device speeds that price recomputation; ``None`` calibrates them for the graph's device.
        fused: model inductor's fusion (``False``: every value materialized, as with ``aot_eager``).
        memo: frontiers already computed, by :func:`_fingerprint` of their joint graph (a backend keeps one: its
            refining compile partitions the same joint graph again, and the frontier does not depend on the budget).

    Returns:
        ``(plan, forward graph, backward graph)``; the plan's ``solve_seconds`` is left to the caller.
    """
    num_fwd_outputs = int(kwargs["num_fwd_outputs"])
    # torch's own choice first (it also runs dead-code elimination and CSE on ``gm``): the reference of a
    # fractional budget, and the answer when there is no budget
    ref_fw, ref_bw = min_cut(gm, joint_inputs, **kwargs)
    full_peak, full_saved = _graph_peak(ref_fw, ref_bw, num_fwd_outputs, fused)
    if budget is None:
        plan = CompiledPlan(None, full_peak, full_peak, full_peak, full_saved, 0.0, 0, True, 0.0)
        return plan, ref_fw, ref_bw
    # torch's partitioner hands ``gm`` a fresh (CSE'd) copy of its graph on every call, tags copied along:
    # memfit's model and tags live on this one, which goes back into ``gm`` before each later call
    graph = gm.graph
    rates = rates if rates is not None else _calibrate(_device_of(gm))
    model = _Model(gm, num_fwd_outputs, rates, fused)

    budget = int(budget * full_peak) if isinstance(budget, float) else int(budget)
    target = int(budget * scale)  # the model's aim: lower than the budget on a refining compile
    start = _default_recompute(model)
    # torch's own choices are candidates too: its default partition (computed above) and its knapsack's
    key = _fingerprint(model, num_fwd_outputs)
    known = None if memo is None else memo.get(key)
    if known is None:
        torch_sets = [_recomputed_by(model, ref_fw, num_fwd_outputs)]
        torch_sets += _torch_choices(model, gm, graph, joint_inputs, min_cut, kwargs)
        frontier = _frontier(model, start, torch_sets)
        if memo is not None:
            memo[key] = [(peak, cost, frozenset(n.name for n in r)) for peak, cost, r in frontier]
    else:  # the same joint graph as an earlier compile (the refining one): its frontier, by node names
        by_name = {n.name: n for n in model.nodes}
        frontier = [(peak, cost, {by_name[name] for name in names}) for peak, cost, names in known]
    # the cheapest point whose predicted peak fits (the frontier's peaks rise as its costs fall, so the choice
    # is monotone in the budget); where the partitioned graphs exceed the target after all, the next lower
    # points, and at last the lowest
    fits = [i for i, point in enumerate(frontier) if point[0] <= target]
    tries = list(range(fits[-1], max(fits[-1] - 3, -1), -1)) if fits else []
    tries += [] if 0 in tries else [0]
    built: dict[int, int] = {}  # frontier point -> peak of its partitioned graphs
    for attempt, i in enumerate(tries):
        chosen = frontier[i][2]
        gm.graph = graph
        _tag(model, chosen)
        fw_gm, bw_gm = min_cut(gm, joint_inputs, **kwargs)
        peak, saved_bytes = _graph_peak(fw_gm, bw_gm, num_fwd_outputs, fused)
        built[i] = peak
        log.debug(
            "frontier point %d: model peak %d, partitioned graphs %d (attempt %d)",
            i,
            frontier[i][0],
            peak,
            attempt,
        )
        if peak <= target:
            break
    if peak > full_peak:  # never build a plan predicted above torch's own partition: keep torch's
        log.debug(
            "every point tried peaks above torch's partition (%d > %d): torch's is kept", peak, full_peak
        )
        gm.graph = graph
        chosen = _recomputed_by(model, ref_fw, num_fwd_outputs)
        fw_gm, bw_gm, peak, saved_bytes = ref_fw, ref_bw, full_peak, full_saved
    # on a refining compile aimed above the budget (memfit's model ran high), inductor's plan judges the fit
    feasible = peak <= max(budget, target)
    if not feasible:
        warnings.warn(
            f"memfit.remat.backend: budget {budget / 2**20:.1f} MiB is below the lowest peak the compiled path "
            f"reaches ({peak / 2**20:.1f} MiB predicted); using that. Lower budgets need values recomputed "
            "more than once: use memfit.remat.compile (the eager executor) there.",
            stacklevel=2,
        )
    plan = CompiledPlan(
        budget_bytes=budget,
        predicted_peak_bytes=peak,
        full_peak_bytes=full_peak,
        # the lowest point's partitioned graphs where they were built (the model's figure for them where not),
        # and never above torch's own partition
        min_peak_bytes=min(built.get(0, frontier[0][0]), *built.values(), full_peak),
        saved_bytes=saved_bytes,
        recompute_cost_s=model.recompute_cost(chosen, start),
        recomputed_ops=sum(
            1 for n in model.recomputed(chosen) if n not in start and model.kind[n] != "getitem"
        ),
        feasible=feasible,
        solve_seconds=0.0,
        rates=rates,
    )
    return plan, fw_gm, bw_gm


def _torch_choices(
    model: _Model,
    gm: fx.GraphModule,
    graph: fx.Graph,
    joint_inputs: Sequence[object],
    min_cut: Any,
    kwargs: dict[str, Any],
) -> list[set[fx.Node]]:
    """What torch's memory-budget partitioner (a knapsack over the saved activations' bytes and estimated runtime)
    recomputes at each of :data:`_TORCH_LEVELS`, as recompute sets of ``model``.

    They join the greedy passes' prefixes as candidates, priced and simulated by memfit's model like the rest: a
    budget then never gets a plan the model rates costlier than torch's own knob at the same memory. Each is one more
    call of torch's partitioner (``gm.graph`` is put back before each)."""
    sets: list[set[fx.Node]] = []
    config = _compat.functorch_config()
    for level in _TORCH_LEVELS:
        gm.graph = graph
        try:
            with config.patch(activation_memory_budget=level):
                fw_gm, _ = min_cut(gm, joint_inputs, **kwargs)
        except Exception as exc:  # torch's knapsack is an option, not memfit's plan: go on without it
            log.debug("torch's partitioner at activation_memory_budget=%s failed: %s", level, exc)
            continue
        sets.append(_recomputed_by(model, fw_gm, int(kwargs["num_fwd_outputs"])))
    gm.graph = graph
    return sets


def _recomputed_by(model: _Model, fw_gm: fx.GraphModule, num_fwd_outputs: int) -> set[fx.Node]:
    """The recompute set of ``model`` that a partitioned forward stands for: every candidate it does not save (nor
    the storage of a view it saves).

    torch's partitioner may also run backward ops that read no gradient in the forward and save their results (a
    weight's transpose, an activation's derivative); memfit's model keeps those ops in the backward, so it saves
    the forward values they read instead (about the same bytes for a pointwise op)."""
    fw_by_name = {n.name: n for n in model.fw}
    unclaimed = {n.name: n for n in model.unclaimed}
    out = next(n for n in fw_gm.graph.nodes if n.op == "output")
    saved = [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)][num_fwd_outputs:]
    kept = {fw_by_name[a.name] for a in saved if a.name in fw_by_name}
    stack = [unclaimed[a.name] for a in saved if a.name in unclaimed]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a in model._fw_set:
                kept.add(a)
            elif a in model._unclaimed_set:
                stack.append(a)
    kept |= {model.owner[n] for n in kept}
    return {n for n in model.candidates() if n not in kept}


def _frontier(
    model: _Model, start: set[fx.Node], extra: Iterable[set[fx.Node]] = ()
) -> list[tuple[int, float, set[fx.Node]]]:
    """The Pareto frontier of ``(predicted peak, recompute cost, recompute set)`` over the prefixes of the greedy
    passes and the ``extra`` recompute sets: peaks ascending, costs strictly descending (no point is both higher
    and costlier than another)."""
    points: dict[frozenset[fx.Node], tuple[int, float, set[fx.Node]]] = {}

    def add(r: set[fx.Node]) -> None:
        key = frozenset(r)
        if key not in points:
            points[key] = (model.simulate(r)[0], model.recompute_cost(r, start), r)

    for r in extra:
        add(r | start)
    for scale in _COST_SCALES:
        cost = (
            model.cost
            if scale == 1.0
            else {n: c * scale if model.kind[n] == "extern" else c for n, c in model.cost.items()}
        )
        prefixes = [set(start)]
        for move in model.greedy(start, cost):
            prefixes.append(prefixes[-1] | set(move))
        for r in _sampled(prefixes):
            add(r)
    frontier: list[tuple[int, float, set[fx.Node]]] = []
    for point in sorted(points.values(), key=lambda p: (p[0], p[1])):
        if not frontier or point[1] < frontier[-1][1]:
            frontier.append(point)
    return frontier


def _sampled(prefixes: list[set[fx.Node]], most: int = 100) -> list[set[fx.Node]]:
    """At most ``most`` evenly spaced prefixes (always the first and the last): simulating each is linear in the
    graph."""
    n = len(prefixes)
    if n <= most:
        return prefixes
    step = n / most
    idx = sorted({int(i * step) for i in range(most)} | {n - 1})
    return [prefixes[i] for i in idx]


def _device_of(gm: fx.GraphModule) -> torch.device:
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")
