"""Improve a compute sequence under a budget without breaking it.

Two moves, both of which keep the sequence valid (every read finds its value, see
:func:`memfit.remat.solvers._common.free_points`):

- drop a *useless* compute: a copy that nothing reads before it is freed and that is not the final
  copy of an output (saves its cost and its memory);
- drop a *redundant recompute*: instead of freeing ``v`` after its last read and computing it again
  at position ``p``, keep the earlier copy resident until ``p``; allowed when the memory between the
  two stays within the budget with ``v``'s bytes added. Candidates go in order of cost saved per
  byte-step of extra residency.

Frees always sit at the earliest point, so "move frees earlier" is implied by re-placing them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memfit.remat._graph import Graph
from memfit.remat.solvers._common import free_points, profile

__all__ = ["drop_useless", "improve"]


def drop_useless(g: Graph, seq: Sequence[int]) -> list[int]:
    """Remove every compute whose copy is never read and is not an output's final copy.

    One backward sweep: a removed compute no longer reads its deps, so the earlier copies it read
    may become unread too -- they come later in the sweep, so cascades are handled in one pass.
    """
    deps = g._deps
    is_out = g._output
    read: set[int] = set()  # values read (by a kept compute) after the current position, same copy
    later: set[int] = set()
    keep = [True] * len(seq)
    for q in range(len(seq) - 1, -1, -1):
        u = seq[q]
        useful = u in read or (u not in later and is_out[u])
        read.discard(u)
        later.add(u)
        if not useful:
            keep[q] = False
            continue
        read.update(deps[u])
    return [v for v, k in zip(seq, keep, strict=True) if k]


def improve(g: Graph, seq: Sequence[int], budget: int, *, rounds: int = 3) -> list[int]:
    """Drop useless computes and redundant recomputes while the peak stays within ``budget``."""
    cur = drop_useless(g, seq)
    nbytes = g._bytes
    cost = g._cost
    for _ in range(rounds):
        m = len(cur)
        ends = free_points(g, cur)
        mem = profile(g, cur, ends).astype(np.int64)
        prev_pos: dict[int, int] = {}
        cands: list[tuple[float, int, int]] = []  # (-score, p0, p1)
        for p, v in enumerate(cur):
            if v in prev_pos:
                p0 = prev_pos[v]
                e0 = int(ends[p0])
                gap = max(p - e0 - 1, 0)
                score = cost[v] / (max(nbytes[v], 1) * (gap + 1))
                cands.append((-score, p0, p))
            prev_pos[v] = p
        if not cands:
            break
        cands.sort()
        removed = np.zeros(m, dtype=bool)
        # end of the (possibly merged) residency that a removal extends: track per compute position
        end_of = ends.copy()
        changed = False
        for _neg, p0, p1 in cands:
            if removed[p1]:
                continue
            # p0 may have been merged into an earlier copy; find the live copy that reaches p1
            e0 = int(end_of[p0])
            if e0 < 0 or e0 >= p1:
                continue
            v = cur[p1]
            lo, hi = e0 + 1, p1
            if hi > lo and int(mem[lo:hi].max()) + nbytes[v] > budget:
                continue
            mem[lo:hi] += nbytes[v]
            removed[p1] = True
            end_of[p0] = end_of[p1]
            changed = True
        if not changed:
            break
        cur = drop_useless(g, [v for p, v in enumerate(cur) if not removed[p]])
    return cur


def seq_cost(g: Graph, seq: Sequence[int]) -> float:
    """Sum of the costs of the computes."""
    c = g._cost
    return float(sum(c[v] for v in seq))


def seq_peak(g: Graph, seq: Sequence[int]) -> int:
    """Peak of the schedule with these computes and the earliest frees."""
    return int(profile(g, seq).max(initial=g.input_bytes))
