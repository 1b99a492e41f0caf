"""TwRemat: rematerialization by recursion over a tree decomposition (Kumar et al., NeurIPS 2019).

Let ``(X_b)`` be a tree decomposition of the (undirected) graph of needed non-input nodes, of width
``k``. To make a set ``S`` of nodes of a subtree's scope ``U`` resident:

1. pick a balanced separator bag ``X`` of the subtree -- balanced by the *bytes* of the nodes that
   are needed, so no component holds more than half of them (balancing by bag count keeps huge early
   activations alive);
2. for each needed node ``s`` of ``X`` in topological order: recursively make its preds that lie in
   the components of ``subtree - X`` resident, compute ``s``, let those preds go;
3. for each component, recurse for the requested nodes that lie in it (its reads outside the
   component are in ``X`` or further out, hence resident);
4. below the depth limit, compute the needed nodes in topological order.

Every level holds one bag (``k + 1`` values) and the recursion depth is ``O(log n)``, so the peak is
``O(k log n)`` values (the paper's bound) while each node is recomputed at most ``n^{O(log k)}``
times. ``depth=0`` is the no-remat order. Frees go after each value's last read
(:func:`memfit.remat.core.solvers._common.to_schedule`).

References:
    R. Kumar, M. Purohit, Z. Svitkina, E. Vee, J. Wang, "Efficient Rematerialization for Deep
    Networks", NeurIPS 2019 (algorithm TWRemat). The tree decomposition comes from networkx's
    min-fill-in heuristic (min-degree above ``_FILL_IN_MAX`` nodes, which is faster).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import compute_once, to_schedule
from memfit.remat.core.solvers._improve import drop_useless, seq_peak

__all__ = ["solve_twremat", "twremat_sequence", "twremat_sequences"]

_FILL_IN_MAX = 400


def _decomposition(g: Graph) -> tuple[list[frozenset[int]], list[list[int]]]:
    """Bags and bag-tree adjacency of a tree decomposition of the needed nodes (cached on ``g``)."""
    if "tree_decomposition" in g._cache:
        out: tuple[list[frozenset[int]], list[list[int]]] = g._cache["tree_decomposition"]
        return out
    import networkx as nx
    from networkx.algorithms.approximation import treewidth_min_degree, treewidth_min_fill_in

    needed = g.needed()
    inside = set(needed)
    h = nx.Graph()
    h.add_nodes_from(needed)
    for v in needed:
        for d in g.deps(v):
            if d in inside:
                h.add_edge(d, v)
    if h.number_of_nodes() <= _FILL_IN_MAX:
        try:
            _w, tree = treewidth_min_fill_in(h)
        except Exception:  # pragma: no cover - networkx heuristics should not fail
            _w, tree = treewidth_min_degree(h)
    else:
        _w, tree = treewidth_min_degree(h)
    bags = list(tree.nodes)
    index = {b: i for i, b in enumerate(bags)}
    adj = [[index[c] for c in tree.neighbors(b)] for b in bags]
    g._cache["tree_decomposition"] = (bags, adj)
    return bags, adj


class _TwRemat:
    def __init__(self, g: Graph, depth: int | None) -> None:
        self.g = g
        self.depth = depth
        self.bags, self.adj = _decomposition(g)
        self.seq: list[int] = []

    def needed_within(self, targets: Sequence[int], scope: set[int]) -> set[int]:
        deps = self.g._deps
        seen = set(targets)
        stack = list(targets)
        while stack:
            v = stack.pop()
            for d in deps[v]:
                if d in scope and d not in seen:
                    seen.add(d)
                    stack.append(d)
        return seen

    def centroid(self, comp: list[int], weight: dict[int, float]) -> int:
        """The bag whose removal leaves components of at most half the total weight (or closest)."""
        inside = set(comp)
        root = comp[0]
        parent = {root: -1}
        order = [root]
        for b in order:
            for c in self.adj[b]:
                if c in inside and c not in parent:
                    parent[c] = b
                    order.append(c)
        sub = {b: weight.get(b, 0.0) for b in order}
        for b in reversed(order):
            p = parent[b]
            if p >= 0:
                sub[p] += sub[b]
        total = sub[root]
        best, best_val = root, float("inf")
        for b in order:
            worst = total - sub[b]
            for c in self.adj[b]:
                if c in inside and parent.get(c) == b:
                    worst = max(worst, sub[c])
            if worst < best_val:
                best, best_val = b, worst
        return best

    def run(self, comp: list[int], scope: set[int], targets: list[int], level: int) -> None:
        need = self.needed_within(targets, scope)
        if not need:
            return
        if (self.depth is not None and level >= self.depth) or len(need) <= 2 or len(comp) <= 1:
            self.seq.extend(sorted(need))
            return
        # weight each needed node once, on the first bag (of this component) that holds it
        nbytes = self.g._bytes
        weight: dict[int, float] = {}
        placed: set[int] = set()
        for b in comp:
            for v in self.bags[b]:
                if v in need and v not in placed:
                    placed.add(v)
                    weight[b] = weight.get(b, 0.0) + nbytes[v] + 1e-3
        x = self.centroid(comp, weight)
        sep = self.bags[x] & scope
        # components of the bag tree without x, and the scope nodes each one owns
        inside = set(comp)
        inside.discard(x)
        owner: dict[int, int] = {}
        comps: list[list[int]] = []
        for start in self.adj[x]:
            if start not in inside:
                continue
            inside.discard(start)
            part = [start]
            for b in part:
                for c in self.adj[b]:
                    if c in inside:
                        inside.discard(c)
                        part.append(c)
            ci = len(comps)
            comps.append(part)
            for b in part:
                for v in self.bags[b]:
                    if v in scope and v not in sep:
                        owner[v] = ci
        scopes: list[set[int]] = [set() for _ in comps]
        for v, ci in owner.items():
            scopes[ci].add(v)
        deps = self.g._deps
        for s in sorted(sep & need):
            by_comp: dict[int, list[int]] = {}
            for d in deps[s]:
                if d in owner:
                    by_comp.setdefault(owner[d], []).append(d)
            for ci, preds in sorted(by_comp.items()):
                self.run(comps[ci], scopes[ci], preds, level + 1)
            self.seq.append(s)
        by_comp_t: dict[int, list[int]] = {}
        for t in targets:
            if t in owner:
                by_comp_t.setdefault(owner[t], []).append(t)
        for ci, ts in sorted(by_comp_t.items()):
            self.run(comps[ci], scopes[ci], ts, level + 1)


def twremat_sequence(g: Graph, depth: int | None = None) -> list[int]:
    """The TwRemat compute sequence (``depth=None``: recurse fully; ``0``: no remat)."""
    if depth is not None and depth < 0:
        raise ValueError(f"twremat depth must be None or >= 0, got {depth}")
    needed = g.needed()
    if depth == 0 or len(needed) <= 2:
        return needed
    tw = _TwRemat(g, depth)
    outs = [v for v in g.outputs if not g.is_input(v)]
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        tw.run(list(range(len(tw.bags))), set(needed), outs, 0)
    finally:
        sys.setrecursionlimit(old)
    return drop_useless(g, compute_once(g, tw.seq))


def twremat_sequences(g: Graph, *, deadline: float = float("inf")) -> list[tuple[str, list[int]]]:
    """TwRemat at depths 1, 2, 3, ... (until the full recursion), for the budget solver's portfolio."""
    out: list[tuple[str, list[int]]] = []
    prev: list[int] | None = None
    for depth in [1, 2, 3, 4, 6, 8, None]:
        if time.perf_counter() > deadline:
            break
        seq = twremat_sequence(g, depth)
        if seq != prev:
            out.append((f"twremat(depth={depth})", seq))
        prev = seq
    return out


def solve_twremat(g: Graph, budget: int | None, *, depth: int | None = None) -> Schedule:
    """The TwRemat schedule at recursion limit ``depth``.

    Raises:
        InfeasibleBudget: its peak exceeds ``budget`` (``min_peak`` is its peak at this depth; the
            message lists the peaks at the other depths).
    """
    seq = twremat_sequence(g, depth)
    s = to_schedule(g, seq, method="twremat", budget=budget)
    peak = s.simulate().peak
    if budget is not None and peak > budget:
        lows = {name: seq_peak(g, q) for name, q in twremat_sequences(g)}
        raise InfeasibleBudget(
            budget=budget,
            min_peak=peak,
            method="twremat",
            reason=f"at depth={depth}; peaks at other depths: {lows}",
        )
    s.info.update(depth=depth)
    return s
