"""Improve a compute sequence under a budget without breaking it.

Two moves, both of which keep the sequence valid (every read finds its value, see
:func:`memfit.remat.core.solvers._common.free_points`):

- drop a *useless* compute: a copy that nothing reads before it is freed and that is not the final
  copy of an output (saves its cost and its memory);
- drop a *redundant recompute*: instead of freeing ``v`` after its last read and computing it again
  at position ``p``, keep the earlier copy resident until ``p``; allowed when the memory between the
  two stays within the budget with ``v``'s bytes added. Candidates go in order of cost saved per
  byte-step of extra residency.

Frees always sit at the earliest point, so "move frees earlier" is implied by re-placing them.

On small graphs, :func:`stage_search` (and :func:`stage_min_peak`) search another way: simulated
annealing over the keep-sets of Checkmate's stage structure -- the space of the MILP in
:mod:`.milp` -- with an exact, incremental evaluator of each move. It reaches the tight budgets
where the eviction runs find nothing or pay 20-40% more than the MILP's optimum.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import numpy as np

from memfit.remat.core.graph import Graph
from memfit.remat.core.solvers._common import free_points, profile

__all__ = ["drop_useless", "improve", "stage_min_peak", "stage_search"]


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


# ------------------------------------------------------------------ stage-structured annealing


class _Stages:
    """``g`` in Checkmate's stage structure (Jain et al., MLSys 2020), with an exact evaluator.

    Stage ``t`` (``0 <= t < T``) computes the t-th needed node ``v_t`` for the first time, after
    recomputing, in id order and each at most once, whatever it needs. Such a schedule is fixed by
    its *keep-sets*: ``keep[t]``, an int bitmask over stage indices, holds the values resident when
    stage ``t`` starts (the outputs are kept after the last stage). Stage ``t`` recomputes the
    closure of ``v_t`` and of the values kept for stage ``t + 1`` that it does not hold, over the
    deps it does not hold: the least any schedule with those keep-sets computes. These are the
    schedules of the MILP in :mod:`.milp`, so a search over keep-sets searches the space in which
    the MILP is optimal, one cheap evaluation at a time.

    A value that is not recomputable is kept from its stage for as long as anything could read it
    (its bits are fixed, never searched), so no keep-set asks for a second computation of it.
    """

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.order = g.needed()
        T = self.T = len(self.order)
        pos = {v: i for i, v in enumerate(self.order)}
        self.deps = [[pos[d] for d in g._deps[v] if not g._input[d]] for v in self.order]
        self.dmask = [sum(1 << d for d in ds) for ds in self.deps]
        self.nbytes = [g._bytes[v] for v in self.order]
        self.cost = [g._cost[v] for v in self.order]
        self.outputs = sum(1 << i for i, v in enumerate(self.order) if g._output[v])
        users: list[list[int]] = [[] for _ in range(T)]
        for k in range(T):
            for d in self.deps[k]:
                users[d].append(k)
        # live[i]: the last stage that may read v_i, directly or by recomputing a user of it
        self.live = [T if g._output[v] else max(users[i], default=-1) for i, v in enumerate(self.order)]
        for i in range(T - 1, -1, -1):
            for k in users[i]:
                self.live[i] = max(self.live[i], self.live[k])
        self.fixed = [0] * (T + 1)  # keep bits no move may change (values that are not recomputable)
        self.movable: list[int] = []
        for i, v in enumerate(self.order):
            last = min(self.live[i], T - 1)
            if not g._recomputable[v]:
                for t in range(i + 1, last + 1):
                    self.fixed[t] |= 1 << i
            elif last > i:
                self.movable.append(i)
        movable = set(self.movable)
        self.depbits = [sum(1 << d for d in ds if d in movable) for ds in self.deps]
        self.base = g.input_bytes
        # stage evaluations recur all the time during a search (a move changes a few bits)
        self._back_memo: dict[tuple[int, int, int], tuple[int, int, float]] = {}
        self._forward_memo: dict[tuple[int, int, int, int], tuple[int, int]] = {}
        self.unit_bytes = max(1.0, sum(self.nbytes) / max(T, 1))
        self.unit_cost = sum(self.cost) / max(T, 1) or 1.0

    def noremat_keep(self) -> list[int]:
        """Keep-sets that keep every value until its last read: the no-remat schedule."""
        keep = [0] * (self.T + 1)
        for i in range(self.T):
            for t in range(i + 1, min(self.live[i], self.T - 1) + 1):
                keep[t] |= 1 << i
        return keep

    def back(self, t: int, nxt: int, keep: int) -> tuple[int, int, float]:
        """Stage ``t`` given its keep-set and the values ``nxt`` held after it: ``(computes, held,
        cost)``, where ``held`` is the keep-set less what nothing reads before it is dropped."""
        key = (t, nxt, keep)
        hit = self._back_memo.get(key)
        if hit is None:
            if len(self._back_memo) >= _MEMO_LIMIT:
                self._back_memo.clear()
            hit = self._back_memo[key] = self._back(t, nxt, keep)
        return hit

    def _back(self, t: int, nxt: int, keep: int) -> tuple[int, int, float]:
        dmask, cost = self.dmask, self.cost
        have = keep | self.fixed[t]
        todo = (1 << t) | (nxt & ~have)
        r = reads = 0
        total = 0.0
        while todo:
            low = todo & -todo
            todo ^= low
            if r & low:
                continue
            r |= low
            x = low.bit_length() - 1
            total += cost[x]
            reads |= dmask[x]
            todo |= dmask[x] & ~have & ~r
        return r, have & (reads | nxt), total

    def forward(self, held: int, comp: int, nxt: int, cap: int) -> tuple[int, int]:
        """Stage memory: ``(peak, bytes over cap summed over its computes)``; a value goes right
        after its last read in the stage unless ``nxt`` holds it (the earliest free)."""
        key = (held, comp, nxt, cap)
        hit = self._forward_memo.get(key)
        if hit is None:
            if len(self._forward_memo) >= _MEMO_LIMIT:
                self._forward_memo.clear()
            hit = self._forward_memo[key] = self._forward(held, comp, nxt, cap)
        return hit

    def _forward(self, held: int, comp: int, nxt: int, cap: int) -> tuple[int, int]:
        nbytes, deps = self.nbytes, self.deps
        mem = self.base
        while held:
            low = held & -held
            held ^= low
            mem += nbytes[low.bit_length() - 1]
        xs = []
        while comp:
            low = comp & -comp
            comp ^= low
            xs.append(low.bit_length() - 1)
        last: dict[int, int] = {}
        for x in reversed(xs):
            for d in deps[x]:
                last.setdefault(d, x)
        peak = over = 0
        for x in xs:
            mem += nbytes[x]
            if mem > peak:
                peak = mem
            if mem > cap:
                over += mem - cap
            for d in deps[x]:
                if last[d] == x and not nxt >> d & 1:
                    mem -= nbytes[d]
            if x not in last and not nxt >> x & 1:
                mem -= nbytes[x]
        return peak, over

    def sequence(self, comp: Sequence[int]) -> list[int]:
        """The compute sequence (node ids) of per-stage compute bitmasks."""
        out: list[int] = []
        for m in comp:
            while m:
                low = m & -m
                m ^= low
                out.append(self.order[low.bit_length() - 1])
        return out


class _Plan:
    """Keep-sets and their schedule, evaluated stage by stage (so a move re-evaluates few stages).

    ``held[t]`` is what stage ``t`` starts with (``held[T]``: the outputs), ``comp[t]`` what it
    computes; ``cost``, ``peak`` and ``over`` are per stage. The schedule's cost is the sum of the
    stage costs, its peak the largest stage peak (at least the inputs), and the bytes over the cap
    the sum. The compute sequence of ``comp`` has exactly this cost and peak with the earliest
    frees (:func:`seq_peak`; the tests check it).
    """

    __slots__ = ("comp", "cost", "excess", "held", "keep", "over", "peak", "top", "total")

    def __init__(self, st: _Stages, keep: list[int], cap: int) -> None:
        T = st.T
        self.keep = keep
        self.held = [0] * T + [st.outputs]
        self.comp = [0] * T
        self.cost = [0.0] * T
        self.peak = [0] * T
        self.over = [0] * T
        self._update(st, T - 1, T, None, cap)

    def _update(self, st: _Stages, hi: int, lo: int, old: list[int] | None, cap: int) -> None:
        """Re-evaluate stages from ``hi`` down: all of them (``old is None``), else until a stage
        below ``lo`` (the lowest changed keep-set) sees the same ``held`` after it as before."""
        keep, held, comp = self.keep, self.held, self.comp
        for t in range(hi, -1, -1):
            if old is not None and t < lo and held[t + 1] == old[t + 1]:
                break
            comp[t], held[t], self.cost[t] = st.back(t, held[t + 1], keep[t])
            self.peak[t], self.over[t] = st.forward(held[t], comp[t], held[t + 1], cap)
        self.total = sum(self.cost)
        self.top = max(self.peak, default=st.base)
        self.excess = sum(self.over)

    def moved(self, st: _Stages, rows: dict[int, int], cap: int) -> _Plan:
        """A copy with ``keep[t] = rows[t]`` for the given stages, re-evaluated where it changed."""
        new = _Plan.__new__(_Plan)
        new.keep = self.keep.copy()
        for t, m in rows.items():
            new.keep[t] = m
        new.held, new.comp = self.held.copy(), self.comp.copy()
        new.cost, new.peak, new.over = self.cost.copy(), self.peak.copy(), self.over.copy()
        new._update(st, max(rows), min(rows), self.held, cap)
        return new


class _Annealer:
    """Simulated annealing over keep-sets (Kirkpatrick et al., Science 1983), in two phases.

    A move picks a searchable value and flips whether one stage keeps it, or makes a run of stages
    keep (drop) it -- some of those runs also drop (keep) its deps, trading a value for what
    recomputes it. Every schedule evaluated is a candidate: :attr:`fit` is the cheapest within
    ``cap`` (the budget), :attr:`low` the one with the lowest peak. A seeded :class:`random.Random`
    fixes the whole run, so the result depends on the deadline only when the deadline cuts it short.
    """

    def __init__(self, st: _Stages, cap: int, seed: int, deadline: float) -> None:
        self.st = st
        self.cap = cap
        self.rnd = random.Random(seed)
        self.deadline = deadline
        self.fit: _Plan | None = None  # the cheapest plan within the cap
        self.low: _Plan | None = None  # the plan with the lowest peak (then cost)
        self.evals = 0

    def see(self, p: _Plan) -> None:
        """Record ``p`` as a candidate."""
        if p.top <= self.cap and (self.fit is None or p.total < self.fit.total - 1e-12):
            self.fit = p
        if self.low is None or (p.top, p.total) < (self.low.top, self.low.total):
            self.low = p

    def move(self, p: _Plan) -> _Plan:
        """A random neighbour of ``p``."""
        st, rnd = self.st, self.rnd
        i = st.movable[rnd.randrange(len(st.movable))]
        lo, hi = i + 1, min(st.live[i], st.T - 1)
        bit = 1 << i
        kind = rnd.random()
        if kind < 0.4:
            t = rnd.randint(lo, hi)
            rows = {t: p.keep[t] ^ bit}
        else:
            a, b = sorted((rnd.randint(lo, hi), rnd.randint(lo, hi)))
            on = rnd.random() < 0.5
            dbits = st.depbits[i] if kind >= 0.7 else 0
            rows = {
                t: (p.keep[t] | bit) & ~dbits if on else (p.keep[t] & ~bit) | dbits for t in range(a, b + 1)
            }
        self.evals += 1
        new = p.moved(st, rows, self.cap)
        self.see(new)
        return new

    def run(self, p: _Plan, evals: int, lowering: bool, until_fit: bool = False) -> _Plan:
        """Anneal from ``p`` for ``evals`` moves (fewer past the deadline, or once ``p`` fits the
        cap when ``until_fit``); temperature ``_T_HIGH -> _T_LOW`` geometrically.

        ``lowering``: the objective is the bytes over the cap (summed over every compute, in units
        of the mean value size) plus a hundredth of the cost (in units of the mean node cost);
        otherwise the cost plus a penalty per unit over the cap, which starts at
        :data:`_OVER_PENALTY` and adapts every :data:`_WINDOW` moves (x1.5 when the search spent
        most of them over the cap, /1.5 when it spent few) -- the strategic oscillation of
        Gendreau, Hertz and Laporte (Management Science 1994), so that tight budgets are searched
        along both sides of the boundary.
        """
        ub, uc = self.st.unit_bytes, self.st.unit_cost
        penalty = _OVER_PENALTY

        def objective(q: _Plan) -> float:
            if lowering:
                return q.excess / ub + 0.01 * q.total / uc
            return q.total / uc + penalty * q.excess / ub

        cur = objective(p)
        over = 0  # moves in the current window that ended over the cap
        for it in range(evals if self.st.movable else 0):
            if it % 32 == 0 and time.perf_counter() > self.deadline:
                break
            if until_fit and p.excess == 0:
                break
            new = self.move(p)
            o = objective(new)
            temp = _T_HIGH * (_T_LOW / _T_HIGH) ** (it / evals)
            if o <= cur or self.rnd.random() < math.exp((cur - o) / temp):
                p, cur = new, o
            over += p.excess > 0
            if not lowering and it % _WINDOW == _WINDOW - 1:
                # strategic oscillation: mostly over the cap -> dearer, mostly within -> cheaper
                if over > _WINDOW // 2:
                    penalty = min(penalty * 1.5, 1000.0)
                elif over < _WINDOW // 5:
                    penalty = max(penalty / 1.5, 1.0)
                over = 0
                cur = objective(p)
        return p


_MEMO_LIMIT = 200_000  # entries per stage-evaluation memo (a few tens of MB at most)
_OVER_PENALTY = 10.0  # phase 2, initially: a mean value size over the cap costs ten mean nodes
_LOWER_EVALS = 1500  # phase 1: moves per attempt to get under the budget
_T_HIGH, _T_LOW = 0.5, 0.02  # in units of the objective (mean node costs or value sizes)
_ROUNDS = 3
_WINDOW = 50  # phase 2 moves between penalty updates


def stage_search(
    g: Graph,
    budget: int,
    *,
    evals: int = 12000,
    starts: Sequence[Sequence[int]] | None = None,
    attempts: int = 4,
    seed: int = 0,
    deadline: float = math.inf,
) -> list[int] | None:
    """A cheap compute sequence within ``budget`` by annealing over Checkmate's keep-sets.

    From each start (by default the no-remat schedule's keep-sets): phase 1, when the start does
    not fit, is up to ``attempts`` anneals of :data:`_LOWER_EVALS` moves from it, lowering
    the bytes over the budget until a schedule fits; phase 2 anneals the cost from there for
    ``evals / _ROUNDS`` moves (a schedule over budget pays a penalty). Then ``_ROUNDS - 1`` more
    phase-2 anneals of as many moves, each from the cheapest schedule so far (restarts from the
    best solution).

    Args:
        g: the graph (meant for small ones: a move re-evaluates a few stages in Python).
        budget: bytes.
        evals: phase-2 moves with a single start (``evals / _ROUNDS`` more per extra start).
        starts: keep-sets to start from (``start[t]``: bitmask over positions in ``g.needed()``
            of the values resident when stage ``t`` starts, e.g. a MILP solution's ``S``, see
            :func:`memfit.remat.core.solvers.milp.first_keep_sets`); default: the no-remat schedule's.
        attempts: phase 1 anneals per start.
        seed: seeds the moves; the result is deterministic unless ``deadline`` cuts the run short.
        deadline: a :func:`time.perf_counter` value.

    Returns:
        The cheapest compute sequence within ``budget`` met, or ``None``.
    """
    st = _Stages(g)
    if st.T == 0:
        return None
    an = _Annealer(st, budget, seed, deadline)
    per_round = evals // _ROUNDS
    for start in [st.noremat_keep()] if starts is None else starts:
        # only values computed before a stage can be resident when it starts
        keep = [(start[t] if t < len(start) else 0) & ((1 << t) - 1) for t in range(st.T + 1)]
        first = p = _Plan(st, keep, budget)
        an.see(first)
        for _ in range(attempts):
            if p.excess == 0:
                break
            p = an.run(first, _LOWER_EVALS, lowering=True, until_fit=True)
        if p.excess == 0:
            an.run(p, per_round, lowering=False)
    for _ in range(_ROUNDS - 1):
        if an.fit is None:
            break
        an.run(an.fit, per_round, lowering=False)
    return None if an.fit is None else st.sequence(an.fit.comp)


def stage_min_peak(
    g: Graph, *, evals: int = 6000, seed: int = 0, deadline: float = math.inf
) -> tuple[int, list[int]]:
    """The lowest peak that annealing over keep-sets reaches, and a compute sequence with it.

    Phase-1 anneals from the no-remat schedule against a cap one byte under the lowest peak met so
    far, re-aimed each time the current schedule gets under it, for ``evals`` moves in all.
    Deterministic for a given ``seed`` unless ``deadline`` cuts it short.
    """
    st = _Stages(g)
    p = _Plan(st, st.noremat_keep(), st.base)
    an = _Annealer(st, p.top, seed, deadline)
    an.see(p)
    left = evals
    while an.low is not None and an.low.top > st.base and left > 0:
        an.cap = an.low.top - 1
        p = _Plan(st, p.keep, an.cap)
        before = an.evals
        p = an.run(p, left, lowering=True, until_fit=True)
        left -= an.evals - before
        if p.excess > 0:
            break  # out of moves (or time) before getting under the cap
    assert an.low is not None
    return an.low.top, st.sequence(an.low.comp)
