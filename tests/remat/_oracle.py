"""Exhaustive search over schedules (the test oracle), written independently of the solvers.

Dijkstra over states (resident set, ever-computed set): moves are ``compute v`` (deps resident, v
not resident, memory after it within the budget, non-recomputable at most once) at cost ``c_v``
and ``free v`` at cost 0; goal: every output resident. ``frontier=True`` restricts to Checkmate's stage
structure: first computations follow node ids (each one ends a stage), and the recomputations inside
a stage go in increasing id order, each at most once; there is no stage after the last first
computation.
"""

from __future__ import annotations

import heapq


def exhaustive(g, budget, *, frontier: bool):
    """Least cost of a valid schedule within ``budget`` (inf if none)."""
    needed = g.needed()
    idx = {v: i for i, v in enumerate(needed)}
    n = len(needed)
    b = [g.nbytes(v) for v in needed]
    c = [g.cost(v) for v in needed]
    deps = [[idx[d] for d in g.deps(v) if not g.is_input(d)] for v in needed]
    recomp = [g.is_recomputable(v) for v in needed]
    goal = 0
    for v in needed:
        if g.is_output(v):
            goal |= 1 << idx[v]
    base = g.input_bytes
    if base > budget:
        return float("inf")
    start = (0, 0, -1)
    dist = {start: 0.0}
    heap = [(0.0, 0, 0, -1)]
    while heap:
        d, res, ever, last = heapq.heappop(heap)
        if dist.get((res, ever, last), float("inf")) < d:
            continue
        if res & goal == goal:
            return d
        mem = base + sum(b[i] for i in range(n) if res >> i & 1)
        nxt_first = next((i for i in range(n) if not ever >> i & 1), n)
        for i in range(n):
            bit = 1 << i
            if res & bit:
                st = (res & ~bit, ever, last)
                if d < dist.get(st, float("inf")):
                    dist[st] = d
                    heapq.heappush(heap, (d, *st))
                continue
            if ever & bit and not recomp[i]:
                continue
            first = not ever & bit
            if frontier and first and i != nxt_first:
                continue
            if frontier and not first and (i <= last or nxt_first == n):
                continue  # in-stage id order; nothing after the last stage
            if any(not res >> j & 1 for j in deps[i]):
                continue
            if mem + b[i] > budget:
                continue
            st = (res | bit, ever | bit, (-1 if first else i) if frontier else -1)
            nd = d + c[i]
            if nd < dist.get(st, float("inf")) - 1e-12:
                dist[st] = nd
                heapq.heappush(heap, (nd, *st))
    return float("inf")


def min_feasible_peak(g, *, frontier: bool, hi: int):
    """Smallest budget with a schedule (bisection over the exhaustive search)."""
    lo = g.input_bytes - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if exhaustive(g, mid, frontier=frontier) < float("inf"):
            hi = mid
        else:
            lo = mid
    return hi
