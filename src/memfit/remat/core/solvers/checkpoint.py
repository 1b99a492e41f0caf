"""Checkpointing baselines users know: keep every k-th cut point, recompute the segments between.

(On chains, ``solve_checkpoint`` also runs the optimal revolve/rotor DP of :mod:`.chain_dp`.)

Chen et al. (2016), "Training Deep Nets with Sublinear Memory Cost": in the forward pass keep only
the checkpoints (every ``k``-th candidate; ``k = sqrt(#candidates)`` by default) and drop the other
forward values after their forward reads; the backward pass recomputes a dropped value from the
nearest resident ones when it needs it, and keeps the recomputed segment until its last read.

Forward part: the ancestors of the loss, found as the first output that other outputs depend on
(all nodes if there is none). Candidates: the articulation points of the forward part's undirected
graph (inputs left out, as they are always resident) -- the nodes every forward path crosses; on a
chain that is every layer, on a residual ladder every block boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import compute_once, noremat_order, to_schedule
from memfit.remat.core.solvers._improve import drop_useless, seq_cost, seq_peak

__all__ = ["checkpoint_sequence", "checkpoint_sequences", "keep_sequence", "solve_checkpoint"]


def _forward_and_candidates(g: Graph) -> tuple[list[int], list[int]]:
    if "checkpoint_candidates" in g._cache:
        out: tuple[list[int], list[int]] = g._cache["checkpoint_candidates"]
        return out
    import networkx as nx

    needed = g.needed()
    outs = [v for v in g.outputs if not g.is_input(v)]
    anc: dict[int, set[int]] = {}
    loss = None
    for o in outs:
        seen = {o}
        stack = [o]
        while stack:
            v = stack.pop()
            for d in g.deps(v):
                if d not in seen and not g.is_input(d):
                    seen.add(d)
                    stack.append(d)
        anc[o] = seen
    for o in sorted(outs):
        if any(o in anc[p] for p in outs if p != o):
            loss = o
            break
    fwd = sorted(anc[loss]) if loss is not None else needed
    fset = set(fwd)
    h = nx.Graph()
    h.add_nodes_from(fwd)
    for v in fwd:
        for d in g.deps(v):
            if d in fset:
                h.add_edge(d, v)
    cands = sorted(set(nx.articulation_points(h)))
    if not cands:
        cands = fwd[:-1]
    g._cache["checkpoint_candidates"] = (fwd, cands)
    return fwd, cands


def checkpoint_sequence(g: Graph, every: int) -> list[int]:
    """Compute sequence keeping every ``every``-th candidate as a checkpoint (Chen et al. 2016)."""
    if every < 1:
        raise ValueError(f"checkpoint every must be >= 1, got {every}")
    _fwd, cands = _forward_and_candidates(g)
    return keep_sequence(g, cands[every - 1 :: every])


def keep_sequence(g: Graph, keep: Iterable[int]) -> list[int]:
    """Compute sequence of checkpointing with the forward values ``keep`` as checkpoints: the forward pass keeps
    them and drops every other forward value after its last forward read; the backward recomputes a dropped
    value from the nearest resident ones when it needs it, and keeps the recomputed copy until its last read.

    With ``keep`` = the input of every block this is per-block checkpointing (``torch.utils.checkpoint`` around
    each block, or HF's ``gradient_checkpointing_enable``), which holds each block's internals only while that
    block's backward runs.
    """
    fwd, _cands = _forward_and_candidates(g)
    keep = set(keep)
    fset = set(fwd)
    main = noremat_order(g)
    step = {v: t for t, v in enumerate(main)}
    # drop point: the last forward read of a dropped forward value
    drop_at: dict[int, int] = {}
    for v in fwd:
        if v in keep or g.is_output(v):
            continue
        reads = [step[u] for u in g.users(v) if u in fset and u in step]
        drop_at[v] = max(reads) if reads else step[v]
    expire: dict[int, list[int]] = {}
    for v, t in drop_at.items():
        expire.setdefault(t, []).append(v)
    resident: set[int] = set(g.inputs)
    seq: list[int] = []

    def materialize(v: int) -> None:
        stack = [v]
        while stack:
            u = stack[-1]
            missing = [d for d in g.deps(u) if d not in resident]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            if u not in resident:
                resident.add(u)
                seq.append(u)

    for t, v in enumerate(main):
        materialize(v)
        for u in expire.get(t, ()):
            resident.discard(u)  # recomputed copies made later stay until their last read
    return drop_useless(g, compute_once(g, seq))


def checkpoint_sequences(g: Graph) -> list[tuple[str, list[int]]]:
    """Segmentations every k for k = 2, 3, 4, sqrt(n), 2 sqrt(n) candidates (for the budget portfolio)."""
    _fwd, cands = _forward_and_candidates(g)
    r = max(1, round(math.sqrt(len(cands))))
    ks = sorted({k for k in (2, 3, 4, r, 2 * r) if 1 <= k <= max(1, len(cands))})
    return [(f"checkpoint(every={k})", checkpoint_sequence(g, k)) for k in ks]


def _dp_min_peak(g: Graph, lo: int, hi: int) -> int:
    """Smallest budget in ``(lo, hi]`` at which the chain DP finds a schedule (bisection)."""
    from memfit.remat.core.solvers.chain_dp import chain_dp_sequence

    if chain_dp_sequence(g, hi) is None:
        return hi  # not reached in practice: store-all fits the no-remat peak
    while hi - lo > max(1, hi // 1000):
        mid = (lo + hi) // 2
        if chain_dp_sequence(g, mid) is not None:
            hi = mid  # a budget the (deterministic) DP is known to meet
        else:
            lo = mid
    return hi


def solve_checkpoint(
    g: Graph, budget: int | None, *, every: int | None = None, strategy: str = "auto"
) -> Schedule:
    """Checkpointing: Chen's sqrt(n) / every-k segments, or the chain-optimal DP (revolve / rotor).

    Args:
        g: the graph.
        budget: bytes, or ``None``.
        every: keep every ``every``-th candidate (implies ``strategy="sqrt"``).
        strategy: ``"sqrt"``: every-k segmentations (sqrt(n) without a budget, else the cheapest k
            that fits); ``"dp"``: the optimal DP of :mod:`.chain_dp` (the graph must be a chain and
            a budget given); ``"auto"`` (default): with a budget on a chain, the cheaper of the DP and
            the segmentations, otherwise ``"sqrt"``.

    Raises:
        InfeasibleBudget: nothing fits (``min_peak`` is the lowest peak reached).
        ValueError: an unknown strategy, ``"dp"`` on a graph that is not a chain or without a budget.
    """
    from memfit.remat.core.solvers.chain_dp import as_chain, chain_dp_sequence

    if strategy not in ("auto", "sqrt", "dp"):
        raise ValueError(f"checkpoint strategy must be 'auto', 'sqrt' or 'dp', got {strategy!r}")
    if every is not None and strategy == "dp":
        raise ValueError("checkpoint: every= sets the sqrt/every-k strategy; drop it for strategy='dp'")
    use_dp = strategy == "dp" or (strategy == "auto" and every is None and budget is not None)
    if strategy == "dp" and budget is None:
        raise ValueError("checkpoint strategy='dp' needs a budget (without one nothing is recomputed)")
    if strategy == "dp" and as_chain(g) is None:
        raise ValueError(
            "checkpoint strategy='dp' needs a chain: a forward path whose backward reads one forward "
            "value per node, stage by stage (see memfit.remat.core.solvers.chain_dp); use strategy='sqrt'"
        )
    seqs: list[tuple[str, list[int]]] = []
    if use_dp and as_chain(g) is not None:
        assert budget is not None
        q = chain_dp_sequence(g, budget)
        if q is not None:
            seqs.append(("chain-dp", q))
    if strategy != "dp":
        if every is not None:
            seqs.append((f"checkpoint(every={every})", checkpoint_sequence(g, every)))
        elif budget is None:
            _fwd, cands = _forward_and_candidates(g)
            k = max(1, round(math.sqrt(len(cands))))
            seqs.append((f"checkpoint(every={k})", checkpoint_sequence(g, k)))
        else:
            seqs += checkpoint_sequences(g)
    fits = [(seq_cost(g, q), name, q) for name, q in seqs if budget is None or seq_peak(g, q) <= budget]
    if not fits:
        assert budget is not None
        peaks = [seq_peak(g, q) for _n, q in seqs]
        if use_dp and as_chain(g) is not None:
            peaks.append(_dp_min_peak(g, budget, seq_peak(g, noremat_order(g))))
        raise InfeasibleBudget(budget=budget, min_peak=min(peaks), method="checkpoint")
    _c, name, q = min(fits, key=lambda x: x[0])
    s = to_schedule(g, q, method="checkpoint", budget=budget)
    s.info.update(candidate=name)
    return s
