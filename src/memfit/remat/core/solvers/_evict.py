"""Run a compute order under a byte budget, evicting values and recomputing them on demand.

The main order (every needed node once, topologically) is executed step by step. Before a compute
that would take memory over the budget, a resident value is evicted -- the one with the lowest
score ``recompute_cost / (bytes * distance**alpha)``; a later read recomputes it (recursively, from
whatever is resident). Two ways to measure distance:

- ``"belady"``: main steps until the value's next use (the whole graph is known ahead, so this is
  Belady's furthest-next-use rule weighted by recompute cost per byte);
- ``"dtr"``: steps since the value was last used (staleness), as Dynamic Tensor Rematerialization
  does without knowledge of the future (Kirisame et al., ICLR 2021, h = cost / (bytes * staleness)).

The recompute cost of ``v`` is its own cost plus that of its deps that are not resident (one level
of DTR's "evicted neighbourhood"). The output is a compute sequence: frees go where
:func:`memfit.remat.core.solvers._common.to_schedule` puts them, which never holds more than this
simulation held, so the schedule's peak is at most the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy.sparse import csr_matrix

from memfit.remat.core.graph import Graph

__all__ = ["evict_run"]

_INF = np.iinfo(np.int64).max // 4


def _dep_matrix(g: Graph) -> csr_matrix:
    if "depmat" not in g._cache:
        rows, cols = [], []
        for v in range(len(g)):
            for d in g._deps[v]:
                rows.append(v)
                cols.append(d)
        n = len(g)
        g._cache["depmat"] = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    m: csr_matrix = g._cache["depmat"]
    return m


def _closure_cost(g: Graph) -> np.ndarray:
    """Cost of a node plus (an over-count of) its non-input ancestors', capped at the total."""
    if "closure_cost" not in g._cache:
        total = float(sum(g._cost[v] for v in g.needed()))
        acc = [0.0] * len(g)
        for v in range(len(g)):
            if not g._input[v]:
                acc[v] = min(total, g._cost[v] + sum(acc[d] for d in g._deps[v]))
        g._cache["closure_cost"] = np.asarray(acc)
    out: np.ndarray = g._cache["closure_cost"]
    return out


def evict_run(
    g: Graph,
    budget: int,
    *,
    order: Sequence[int] | None = None,
    policy: Literal["belady", "dtr"] = "belady",
    alpha: float = 1.0,
    keep: Sequence[int] = (),
    noise: float = 0.0,
    seed: int = 0,
) -> list[int] | None:
    """Execute ``order`` within ``budget`` bytes; return the compute sequence, or ``None`` if stuck.

    Args:
        g: the graph.
        budget: bytes.
        order: main order (default: needed nodes in id order).
        policy: ``"belady"`` (distance to next use) or ``"dtr"`` (staleness).
        alpha: exponent on the distance in the score.
        keep: values never to evict while they have a future use (used by local search).
        noise: multiply each score by ``exp(noise * N(0, 1))`` (randomised restarts).
        seed: seed for the noise.

    Returns:
        The compute sequence, or ``None`` when at some compute no evictable value is left.
    """
    n = len(g)
    main = list(g.needed() if order is None else order)
    nbytes_a, cost_a = g.arrays()
    nbytes = g._bytes
    deps = g._deps
    is_out = g._output
    depmat = _dep_matrix(g)
    # uses[v]: main steps that read v, ascending
    uses: list[list[int]] = [[] for _ in range(n)]
    for t, v in enumerate(main):
        for d in deps[v]:
            uses[d].append(t)
    ptr = [0] * n
    T = len(main)
    final = T  # a virtual last step at which every output must be resident
    next_use = np.full(n, _INF, dtype=np.int64)
    for v in range(n):
        if uses[v]:
            next_use[v] = uses[v][0]
        elif is_out[v]:
            next_use[v] = final
    last_use = np.zeros(n, dtype=np.int64)
    res = np.asarray(g._input, dtype=bool).copy()
    evictable = np.asarray(g._recomputable, dtype=bool) & ~res & (nbytes_a > 0)
    if keep:
        evictable[np.asarray(list(keep), dtype=np.int64)] = False
    pin = np.zeros(n, dtype=np.int64)
    mem = g.input_bytes
    seq: list[int] = []
    out_ids = np.flatnonzero(np.asarray(is_out, dtype=bool) & ~np.asarray(g._input, dtype=bool))
    transient = ~(np.asarray(g._input, dtype=bool) | np.asarray(is_out, dtype=bool))
    safe_b = np.maximum(nbytes_a, 1).astype(np.float64)

    is_out_a = np.asarray(is_out, dtype=bool)
    closure = _closure_cost(g)
    evicted_outs: set[int] = set()
    done = [False] * n
    recomputable = g._recomputable
    limit = 30 * len(main) + 1000
    rng = np.random.default_rng(seed)

    def make_room(need: int, t: int) -> bool:
        nonlocal mem
        while mem + need > budget:
            cand = np.flatnonzero(res & evictable & (pin == 0))
            if cand.size == 0:
                return False
            nonres_cost = depmat[cand] @ (cost_a * ~res)
            rc = cost_a[cand] + nonres_cost
            # an output comes back at the end, when its deps are long gone: charge its ancestry
            rc = np.where(is_out_a[cand], closure[cand], rc)
            if policy == "belady":
                dist = (np.minimum(next_use[cand], 4 * (T + 1)) - t).astype(np.float64)
            else:
                dist = (t + 1 - last_use[cand]).astype(np.float64)
            score = rc / (safe_b[cand] * np.maximum(dist, 0.5) ** alpha)
            if noise > 0.0:
                score = score * np.exp(noise * rng.standard_normal(cand.size))
            victim = int(cand[int(np.argmin(score))])
            if is_out[victim]:
                evicted_outs.add(victim)
            res[victim] = False
            mem -= nbytes[victim]
        return True

    def materialize(target: int, t: int) -> bool:
        nonlocal mem
        # each frame: [node, next dep index, deps pinned so far]; all resident deps are pinned on
        # the first visit so that materialising one dep cannot evict a sibling
        stack: list[list[Any]] = [[target, -1, None]]
        while stack:
            top = stack[-1]
            u = top[0]
            dl = deps[u]
            if top[1] < 0:
                held = {d for d in dl if res[d]}
                for d in held:
                    pin[d] += 1
                top[1], top[2] = 0, held
            i, held = top[1], top[2]
            while i < len(dl) and dl[i] in held:
                i += 1
            if i < len(dl):
                d = dl[i]
                if res[d]:
                    pin[d] += 1
                    held.add(d)
                    top[1] = i + 1
                else:
                    top[1] = i
                    stack.append([d, -1, None])
                continue
            if done[u] and not recomputable[u]:
                return False  # a dropout-like value is gone for good
            if not make_room(nbytes[u], t):
                return False
            done[u] = True
            res[u] = True
            mem += nbytes[u]
            seq.append(u)
            if len(seq) > limit:
                return False  # thrashing: evicting what the next compute needs, over and over
            last_use[u] = t
            for d in dl:
                pin[d] -= 1
                last_use[d] = t
            stack.pop()
        return True

    for t, target in enumerate(main):
        if not materialize(target, t):
            return None
        # advance next-use pointers of what this step read; free values nobody reads again
        for d in deps[target]:
            ud = uses[d]
            p = ptr[d]
            while p < len(ud) and ud[p] <= t:
                p += 1
            ptr[d] = p
            next_use[d] = ud[p] if p < len(ud) else (final if is_out[d] else _INF)
        dead = np.flatnonzero(res & (next_use >= _INF) & transient)
        if dead.size == 0:
            continue
        # an evicted output whose deps are all here and one of them is about to go: bring it
        # back now, while that costs one compute, instead of a chain of recomputes at the end
        gone = [o for o in evicted_outs if not res[o] and all(res[d] for d in deps[o])]
        if gone:
            dying = set(dead.tolist())
            gone = [o for o in gone if any(d in dying for d in deps[o])]
        if gone:
            held = {d for o in gone for d in deps[o]}
            first = np.asarray([d for d in dead.tolist() if d not in held], dtype=np.int64)
            res[first] = False
            mem -= int(nbytes_a[first].sum())
            for o in gone:
                if mem + nbytes[o] <= budget:
                    evicted_outs.discard(o)
                    res[o] = True
                    mem += nbytes[o]
                    seq.append(o)
            dead = np.asarray([d for d in dead.tolist() if d in held], dtype=np.int64)
        res[dead] = False
        mem -= int(nbytes_a[dead].sum())
    # outputs evicted on the way come back at the end; the ones already back stay put
    evictable[out_ids[res[out_ids]]] = False
    for v in out_ids.tolist():
        if not res[v]:
            if not materialize(v, final):
                return None
            evictable[v] = False
    return seq
