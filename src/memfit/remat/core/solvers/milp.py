"""Optimal rematerialization within the Checkmate formulation, solved as a MILP with HiGHS.

Checkmate (Jain et al., MLSys 2020) fixes a topological order ``v_0..v_{T-1}`` of the needed
non-input nodes and splits the schedule into ``T`` stages; stage ``t`` computes ``v_t`` for the first
time, after recomputing (in order, each at most once) whichever earlier nodes it chooses. Binaries:

- ``R[t,i]`` (i <= t): ``v_i`` is computed in stage t; ``R[t,t] = 1``.
- ``S[t,i]`` (i < t): ``v_i`` is resident when stage t starts; ``S[T,i] = 1`` exactly for outputs.
- ``FREE[t,i,k]``: ``v_i`` is freed right after computing ``v_k`` in stage t (``i`` is ``k`` or a dep of
  ``k``): ``R[t,k]`` and no later user of ``v_i`` computed in stage t and not ``S[t+1,i]``.

Constraints: a dep is computed earlier in the stage or resident (``R[t,i] <= R[t,j] + S[t,j]``);
what is kept was there (``S[t+1,i] <= R[t,i] + S[t,i]``); memory right after each compute
``U[t,k] = inputs + sum_i S[t,i] b_i + sum_{j<=k} R[t,j] b_j - sum_{j<k} FREE[t,.,j] b <= budget``;
non-recomputable nodes are computed only in their own stage. Objective: ``sum R[t,i] c_i``.

"Optimal" means optimal among schedules with that stage structure for the graph's id order: the
first computations follow node ids, and within a stage each node is computed at most once and in id
order. Unrestricted schedules can occasionally be cheaper (see docs/remat.md and the tests, which
compare with an exhaustive search over both). ``FREE`` is relaxed to a continuous variable bounded
above by each hazard: it can only under-free, so the memory rows stay upper bounds and ``FREE``
takes its exact value wherever memory binds.

References:
    P. Jain et al., "Checkmate: Breaking the Memory Wall with Optimal Tensor Rematerialization",
    MLSys 2020 (formulation of section 4; the FREE linearisation is ours).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, OptimizeWarning, milp
from scipy.sparse import coo_matrix

from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import noremat_order, to_schedule

__all__ = ["solve_milp"]


class _Builder:
    """Variable indices and constraint rows of the formulation."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.order = noremat_order(g)
        T = len(self.order)
        self.T = T
        pos = {v: i for i, v in enumerate(self.order)}
        self.deps = [[pos[d] for d in g.deps(v) if not g.is_input(d)] for v in self.order]
        self.users: list[list[int]] = [[] for _ in range(T)]
        for i in range(T):
            for j in self.deps[i]:
                self.users[j].append(i)
        nb, nc = g.arrays()
        self.b = nb[self.order].astype(np.float64)
        self.c = nc[self.order]
        self.n_r = T * (T + 1) // 2
        self.n_s = T * (T + 1) // 2  # S[t, i] for t = 1..T, i < t
        self.f_index: dict[tuple[int, int, int], int] = {}
        nxt = 2 * self.n_r
        for t in range(T):
            for k in range(t + 1):
                for i in [*self.deps[k], k]:
                    self.f_index[(t, i, k)] = nxt
                    nxt += 1
        self.n_f = nxt - 2 * self.n_r
        self.n = nxt
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def R(self, t: int, i: int) -> int:
        return t * (t + 1) // 2 + i

    def S(self, t: int, i: int) -> int:  # 1 <= t <= T, i < t
        return self.n_r + (t - 1) * t // 2 + i

    def row(self, entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(self.lo)
        for col, val in entries:
            self.rows.append(r)
            self.cols.append(col)
            self.vals.append(val)
        self.lo.append(lo)
        self.hi.append(hi)

    def build(
        self, budget: float | None, peak_var: bool
    ) -> tuple[np.ndarray, LinearConstraint, Bounds, np.ndarray]:
        g, T = self.g, self.T
        n = self.n + (1 if peak_var else 0)
        lb = np.zeros(n)
        ub = np.ones(n)
        for t in range(T):
            lb[self.R(t, t)] = 1.0
            for i in range(t):
                if not g.is_recomputable(self.order[i]):
                    ub[self.R(t, i)] = 0.0
        for i in range(T):
            fixed = 1.0 if g.is_output(self.order[i]) else 0.0
            lb[self.S(T, i)] = ub[self.S(T, i)] = fixed
        inf = np.inf
        for t in range(T):
            for i in range(t + 1):
                for j in self.deps[i]:
                    self.row([(self.R(t, i), 1.0), (self.R(t, j), -1.0), (self.S(t, j), -1.0)], -inf, 0.0)
            for i in range(t + 1):
                ent = [(self.S(t + 1, i), 1.0), (self.R(t, i), -1.0)]
                if i < t:
                    ent.append((self.S(t, i), -1.0))
                self.row(ent, -inf, 0.0)
            for k in range(t + 1):
                for i in [*self.deps[k], k]:
                    f = self.f_index[(t, i, k)]
                    self.row([(f, 1.0), (self.R(t, k), -1.0)], -inf, 0.0)
                    self.row([(f, 1.0), (self.S(t + 1, i), 1.0)], -inf, 1.0)
                    for j in self.users[i]:
                        if k < j <= t:
                            self.row([(f, 1.0), (self.R(t, j), 1.0)], -inf, 1.0)
        base = float(self.g.input_bytes)
        b = self.b
        for t in range(T):
            common = [(self.S(t, i), b[i]) for i in range(t)] if t > 0 else []
            acc: list[tuple[int, float]] = []
            for k in range(t + 1):
                acc.append((self.R(t, k), b[k]))
                if k > 0:
                    for i in [*self.deps[k - 1], k - 1]:
                        acc.append((self.f_index[(t, i, k - 1)], -b[i]))
                ent = common + acc
                if peak_var:
                    self.row([*ent, (self.n, -1.0)], -inf, -base)
                else:
                    assert budget is not None
                    self.row(ent, -inf, budget - base)
        obj = np.zeros(n)
        if peak_var:
            obj[self.n] = 1.0
            lb[self.n] = 0.0
            ub[self.n] = inf
        else:
            for t in range(T):
                for i in range(t + 1):
                    obj[self.R(t, i)] = self.c[i]
        integrality = np.zeros(n)
        integrality[: 2 * self.n_r] = 1
        A = coo_matrix((self.vals, (self.rows, self.cols)), shape=(len(self.lo), n)).tocsr()
        return obj, LinearConstraint(A, np.asarray(self.lo), np.asarray(self.hi)), Bounds(lb, ub), integrality

    def computes(self, x: np.ndarray) -> list[int]:
        out = []
        for t in range(self.T):
            for i in range(t + 1):
                if x[self.R(t, i)] > 0.5:
                    out.append(self.order[i])
        return out


def _run(
    g: Graph, budget: float | None, min_peak: bool, time_limit: float, gap: float
) -> tuple[_Builder, Any]:
    """Build the Checkmate MILP for ``g`` and solve it with HiGHS; the builder reads the computes back."""
    bld = _Builder(g)
    obj, cons, bounds, integ = bld.build(budget, min_peak)
    res = milp(
        obj,
        constraints=cons,
        bounds=bounds,
        integrality=integ,
        options={"time_limit": time_limit, "disp": False, "mip_rel_gap": gap},
    )
    return bld, res


def first_keep_sets(g: Graph, budget: int, *, time_limit: float = 5.0) -> list[int] | None:
    """The keep-sets of the first schedule within ``budget`` that HiGHS finds, or ``None``.

    HiGHS stops at its first feasible solution (its option ``mip_max_improving_sols=1``, which
    ``scipy.optimize.milp`` passes on verbatim), usually found by its primal heuristics at the root
    within a fraction of a second even where proving optimality takes minutes; a HiGHS without the
    option runs to ``time_limit`` and its best schedule is taken. ``keep[t]`` is the ``S`` row of
    stage ``t`` as a bitmask over positions in ``g.needed()`` -- a start for
    :func:`memfit.remat.core.solvers._improve.stage_search`. ``None`` when nothing was found within
    ``time_limit`` seconds (the formulation may be infeasible: HiGHS rarely proves that quickly).
    """
    bld = _Builder(g)
    obj, cons, bounds, integ = bld.build(float(budget), False)
    with warnings.catch_warnings():
        # scipy: "Unrecognized options ... passed to HiGHS verbatim" (and HiGHS's own complaint
        # if it does not know the option)
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", OptimizeWarning)
        res = milp(
            obj,
            constraints=cons,
            bounds=bounds,
            integrality=integ,
            options={"time_limit": time_limit, "disp": False, "mip_max_improving_sols": 1},
        )
    if res.x is None:
        return None
    x = np.asarray(res.x)
    keep = [0] * (bld.T + 1)
    for t in range(1, bld.T):
        for i in range(t):
            if x[bld.S(t, i)] > 0.5:
                keep[t] |= 1 << i
    return keep


def min_peak_milp(g: Graph, *, time_limit: float = 60.0) -> int:
    """The smallest peak reachable within the Checkmate formulation (an upper bound if timed out)."""
    bld, res = _run(g, None, True, time_limit, 1e-9)
    if res.x is None:
        raise TimeoutError(f"milp: no schedule found within time_limit={time_limit}s")
    s = to_schedule(g, bld.computes(np.asarray(res.x)), method="milp", budget=None)
    return s.simulate().peak


def solve_milp(g: Graph, budget: int | None, *, time_limit: float = 60.0) -> Schedule:
    """The least-cost schedule within ``budget`` (Checkmate formulation, HiGHS).

    Args:
        g: the graph (keep it small: the model has O(T^2) binaries and rows for T needed nodes).
        budget: bytes, or ``None`` for no limit (then the result is the no-remat schedule's cost).
        time_limit: seconds for HiGHS; on time-out the best schedule found is returned with
            ``info["optimal"] = False``.

    Returns:
        The schedule; ``info`` holds ``optimal``, ``objective`` and ``solve_time_s``.

    Raises:
        InfeasibleBudget: the formulation has no schedule within ``budget``; ``min_peak`` is the
            formulation's smallest peak (solved as a second MILP).
        TimeoutError: HiGHS found no schedule within ``time_limit`` and could not prove infeasibility.
    """
    t0 = time.perf_counter()
    if budget is None:
        s = to_schedule(g, noremat_order(g), method="milp", budget=None)
        s.info.update(optimal=True, objective=s.simulate().cost, solve_time_s=time.perf_counter() - t0)
        return s
    bld, res = _run(g, float(budget), False, time_limit, 1e-9)
    if res.x is None:
        if res.status == 2:  # infeasible
            try:
                mp = min_peak_milp(g, time_limit=time_limit)
            except TimeoutError:
                mp = budget + 1
            raise InfeasibleBudget(budget=budget, min_peak=mp, method="milp")
        raise TimeoutError(
            f"milp: no schedule within budget {budget:,} B found in time_limit={time_limit}s ({res.message})"
        )
    s = to_schedule(g, bld.computes(np.asarray(res.x)), method="milp", budget=budget)
    s.info.update(optimal=res.status == 0, objective=float(res.fun), solve_time_s=time.perf_counter() - t0)
    if s.simulate().peak > budget:  # cannot happen: the memory rows bound the extracted schedule
        raise AssertionError(f"milp: extracted peak {s.simulate().peak} exceeds budget {budget}")
    return s
