"""The default solver: the least recompute cost that fits a byte budget, on graphs of thousands of nodes.

Algorithm (a portfolio, every candidate measured by the same simulator):

1. Candidates: the no-remat order; the eviction run (:mod:`._evict`) with Belady-style scores at
   a few distance exponents; on chains, the optimal checkpointing DP (:mod:`.chain_dp`); and, when
   they fit, sqrt(n)/every-k checkpoint segmentations and TwRemat at several recursion depths.
2. Each candidate that fits is improved under the budget (:func:`._improve.improve`: drop useless
   computes, keep values resident instead of recomputing them where memory allows).
3. Local search on the best eviction run: forbid evicting a value that was recomputed, re-run,
   keep the change when the cost falls; stops after ``search_rounds`` or ``time_limit``.
4. On graphs of at most ``stage_nodes`` nodes, simulated annealing over the keep-sets of
   Checkmate's stage structure (:func:`._improve.stage_search`, ``stage_evals`` moves) from the
   no-remat schedule -- and, should that find nothing within the budget, from the first schedule
   HiGHS finds for the MILP (:func:`.milp.first_keep_sets`). The eviction runs miss tight budgets
   on such graphs -- nothing at the smallest feasible peak, or 20-40% over the MILP's cost --
   because one greedy victim choice at a time cannot set up what the optimum does (keep a value's
   inputs instead of the value, recompute a chain once for several outputs at the end); the
   MILP's own incumbents after a second or two are worse still (HiGHS spends that time on cuts at
   the root node).
0. On graphs of at most ``exact_nodes`` needed nodes, the exact search (:mod:`.exact`, optimal over all
   schedules) runs first for ``exact_time`` seconds; when it answers, its schedule, or its proof that nothing
   fits, is the answer.
5. On graphs of at most ``milp_nodes`` nodes, the Checkmate MILP (:mod:`.milp`) for at most ``milp_time``
   seconds is one more candidate.
6. On graphs of at most ``exact_nodes`` needed nodes, when nothing fits or the best candidate costs more than
   1.1x computing each value once (so may be more than 10% above the optimum), the exact search gets a second,
   longer box (``exact_more``).
7. Return the cheapest candidate that fits. If none fits, find the smallest peak the exact search, the eviction
   run (bisecting the budget) or, on small graphs, the annealing reaches and raise :class:`InfeasibleBudget`
   with it (remembered on the graph with its schedule, so that solving again at that peak meets it).

Guarantee: the returned schedule is valid and its simulated peak is at most the budget; it is never over
budget; it is optimal where the exact search answered. Cost against the exact optimum on random training steps
of 12-30 nodes: ``benchmarks/remat_solvers.py --exact-gap`` (docs/remat.md has the measured table).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import lower_bound, noremat_order, to_schedule
from memfit.remat.core.solvers._evict import evict_run
from memfit.remat.core.solvers._improve import improve, seq_cost, seq_peak, stage_min_peak, stage_search

__all__ = ["min_peak_budget", "solve_budget"]

_ALPHAS = (1.0, 2.0, 0.5)
_SEED_TIME = 2.0  # seconds for HiGHS to find a first schedule to restart the stage search from


def _fits(g: Graph, seq: Sequence[int] | None, budget: int) -> bool:
    return seq is not None and seq_peak(g, seq) <= budget


def _structured_candidates(g: Graph, budget: int, deadline: float) -> list[tuple[str, list[int]]]:
    """Checkpoint segmentations and TwRemat depths, as compute sequences (whether or not they fit)."""
    out: list[tuple[str, list[int]]] = []
    try:
        from memfit.remat.core.solvers.checkpoint import checkpoint_sequences

        out += checkpoint_sequences(g)
    except ImportError:  # pragma: no cover - during development only
        pass
    if time.perf_counter() < deadline and len(g) <= 1500:  # tree decompositions get slow
        try:
            from memfit.remat.core.solvers.twremat import twremat_sequences

            out += twremat_sequences(g, deadline=deadline)
        except ImportError:  # pragma: no cover
            pass
    return out


def solve_budget(
    g: Graph,
    budget: int | None,
    *,
    time_limit: float = 5.0,
    search_rounds: int | None = None,
    structured: bool = True,
    restarts: int | None = None,
    exact_nodes: int = 32,
    exact_time: float = 1.0,
    exact_more: float = 30.0,
    milp_nodes: int = 40,
    milp_time: float = 1.0,
    stage_nodes: int = 40,
    stage_evals: int = 12000,
    keep_sets: Mapping[str, Iterable[int]] | None = None,
) -> Schedule:
    """Least-cost schedule within ``budget`` bytes (heuristic; see the module docstring).

    Args:
        g: the graph.
        budget: bytes, or ``None`` (then the no-remat schedule).
        time_limit: soft limit in seconds on the local search and the structured candidates.
        search_rounds: local-search passes (default: 2 for graphs up to 200 nodes, else 0).
        structured: also try checkpoint segmentations and TwRemat as candidates.
        restarts: randomised eviction runs (default: 64 up to 60 nodes, 8 up to 400, else 0).
        exact_nodes: on graphs of at most this many needed nodes, first run the exact search
            (:mod:`.exact`, optimal over all schedules) for at most ``exact_time`` seconds: when it
            answers, its schedule (or its proof that nothing fits) is the result; 0 turns it off.
        exact_time: the exact search's first time box in seconds.
        exact_more: its second box, when the heuristics found nothing within the budget (a sixth of it, at most
            5 s, when what they found costs more than 1.1x computing each value once, so may be more than 10%
            off the optimum).
        milp_nodes: on graphs of at most this many nodes, also run the MILP (Checkmate) for at
            most ``milp_time`` seconds and offer its best schedule; 0 turns it off.
        milp_time: the MILP's time box in seconds.
        stage_nodes: on graphs of at most this many nodes, also anneal over Checkmate's keep-sets
            (a second or two at 40 nodes); 0 turns it off.
        keep_sets: named sets of forward values to checkpoint (:func:`.checkpoint.keep_sequence`), offered as
            candidates and to the least-peak search -- e.g. every block's input, which makes per-block
            checkpointing one of the schedules this solver weighs (``memfit.remat.compile`` passes it when the
            capture names the blocks).
        stage_evals: the annealing's cost-lowering moves (``evals`` of
            :func:`._improve.stage_search`); its own window of ``time_limit`` seconds is a safety
            net: the moves, not the clock, decide its result.

    Returns:
        The cheapest schedule found; ``info["candidate"]`` names where it came from.

    Raises:
        InfeasibleBudget: no candidate fits; ``min_peak`` is the smallest peak found.
    """
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    base = noremat_order(g)
    if budget is None or seq_peak(g, base) <= budget:
        s = to_schedule(g, base, method="budget", budget=budget)
        s.info.update(candidate="noremat", solve_time_s=time.perf_counter() - t0)
        return s
    small = bool(exact_nodes) and len(base) <= exact_nodes
    known = g._cache.get("budget:min-peak")
    if small and known is not None and known[2] and budget < known[0]:
        raise InfeasibleBudget(budget=budget, min_peak=known[0], method="budget")  # proven before
    if small:
        ans = _exact_answer(g, budget, exact_time)
        if ans is not None:
            if ans[1] is None:  # proven: nothing fits
                raise InfeasibleBudget(budget=budget, min_peak=ans[0], method="budget")
            s = to_schedule(g, ans[1], method="budget", budget=budget)
            s.info.update(candidate="exact", optimal=True, solve_time_s=time.perf_counter() - t0)
            return s
    best: tuple[float, str, list[int]] | None = None

    def offer(name: str, seq: list[int] | None) -> None:
        nonlocal best
        if seq is None or not _fits(g, seq, budget):
            return
        if best is not None and seq_cost(g, seq) > 1.5 * best[0]:
            return  # the improvement pass rarely saves a third; skip the expensive ones
        imp = improve(g, seq, budget)
        if not _fits(g, imp, budget):  # the improvement pass is conservative; belt and braces
            imp = seq
        c = seq_cost(g, imp)
        if best is None or c < best[0] - 1e-12:
            best = (c, name, imp)

    runs: dict[float, list[int] | None] = {}
    for a in _ALPHAS:
        if a != _ALPHAS[0] and time.perf_counter() > deadline:
            break
        runs[a] = evict_run(g, budget, alpha=a)
        offer(f"evict(alpha={a})", runs[a])
    outs = [v for v in g.outputs if not g.is_input(v)]
    offer("evict(keep outputs)", evict_run(g, budget, alpha=1.0, keep=outs))
    if structured:
        # on chains, the optimal revolve/rotor DP (cheap: O(P^3 U) with P <= 64 split points here)
        from memfit.remat.core.solvers.chain_dp import chain_dp_sequence

        offer("chain-dp", chain_dp_sequence(g, budget, max_points=64 if len(g) > 1000 else 128))
    if structured and (best is None or len(g) <= 300):
        for name, seq in _structured_candidates(g, budget, deadline):
            offer(name, seq)
    for name, seq in _keep_candidates(g, keep_sets):
        offer(name, seq)
    # randomised restarts of the eviction run: cheap on small graphs, and they find schedules at
    # budgets where the deterministic scores get stuck
    restarts = restarts if restarts is not None else (64 if len(g) <= 60 else 8 if len(g) <= 400 else 0)
    for r in range(restarts):
        if time.perf_counter() > deadline:
            break
        keep = outs if r % 2 else ()
        offer(
            f"evict(noise, seed={r})",
            evict_run(g, budget, alpha=_ALPHAS[r % 3], noise=0.7, seed=r, keep=keep),
        )
    rounds = search_rounds if search_rounds is not None else (2 if len(g) <= 100 else 0)
    if best is not None and rounds > 0:
        _local_search(g, budget, rounds, deadline, offer, lambda: best)
    if stage_nodes and len(g) <= stage_nodes:
        # its own time window, so that a slow start does not cut it short
        offer("stage search", _stage_sequence(g, budget, stage_evals, time.perf_counter() + time_limit))
    # tiny graphs: a time-boxed exact search (the Checkmate MILP) as one more candidate, skipped
    # when the best schedule already computes every node once (nothing to gain)
    if milp_nodes and len(g) <= milp_nodes and budget >= lower_bound(g) and time.perf_counter() < deadline:
        floor = seq_cost(g, base)
        if best is None or best[0] > floor + 1e-9:
            offer("milp", _milp_sequence(g, budget, min(milp_time, deadline - time.perf_counter())))
    cached = g._cache.get("budget:min-peak")
    if cached is not None and cached[0] <= budget:
        offer("min-peak search", list(cached[1]))  # the schedule behind a min_peak this solver reported
    if small and (best is None or best[0] > 1.10 * seq_cost(g, base)):
        # the heuristics found nothing, or nothing they can vouch for (a schedule within 10% of computing each
        # value once is within 10% of the optimum): give the exact search a longer look, so that "nothing
        # fits" is said only where the exact search could not find a schedule either
        ans = _exact_answer(g, budget, exact_more if best is None else min(exact_more / 6, 5.0))
        if ans is not None and ans[1] is not None:
            offer("exact", ans[1])
        elif ans is not None and best is None:  # proven: nothing fits
            raise InfeasibleBudget(budget=budget, min_peak=ans[0], method="budget")
    if best is None:
        mp, found = _min_peak_search(
            g,
            deadline=time.perf_counter() + time_limit,
            stage_nodes=stage_nodes,
            exact_nodes=exact_nodes,
            keep_sets=keep_sets,
        )
        if mp > budget:
            raise InfeasibleBudget(budget=budget, min_peak=mp, method="budget")
        # the min-peak search reached the budget where the candidates above ran out of time (a loaded
        # machine): its schedule fits, so the min_peak this solver reports is always one it can return
        offer("min-peak search", found)
        if best is None:
            best = (seq_cost(g, found), "min-peak search", found)
    _cost, name, seq = best
    s = to_schedule(g, seq, method="budget", budget=budget)
    s.info.update(candidate=name, solve_time_s=time.perf_counter() - t0)
    return s


def _keep_candidates(g: Graph, keep_sets: Mapping[str, Iterable[int]] | None) -> list[tuple[str, list[int]]]:
    """The compute sequences of checkpointing each named keep-set (see ``keep_sets`` of :func:`solve_budget`)."""
    if not keep_sets:
        return []
    from memfit.remat.core.solvers.checkpoint import keep_sequence

    return [(f"keep({name})", keep_sequence(g, keep)) for name, keep in keep_sets.items()]


def _stage_sequence(g: Graph, budget: int, evals: int, deadline: float) -> list[int] | None:
    """Annealing over Checkmate's keep-sets (:func:`._improve.stage_search`) from the no-remat
    schedule; if it gets nowhere under the budget, once more from the first schedule within the
    budget that HiGHS finds for the MILP (:func:`.milp.first_keep_sets`)."""
    from memfit.remat.core.solvers.milp import first_keep_sets

    if budget < lower_bound(g):
        return None  # nothing fits
    seq = stage_search(g, budget, evals=evals, deadline=deadline)
    seed_time = min(_SEED_TIME, deadline - time.perf_counter())
    if seq is None and seed_time > 0.05:
        first = first_keep_sets(g, budget, time_limit=seed_time)
        if first is not None:
            seq = stage_search(g, budget, evals=evals, starts=[first], deadline=deadline)
    return seq


def _exact_answer(g: Graph, budget: int, time_limit: float) -> tuple[int, list[int] | None] | None:
    """The exact search's answer within ``time_limit`` seconds: ``(cost or min peak, sequence)``, with sequence
    ``None`` when it proved that nothing fits (then the first item is the least peak, if that search also
    finished in time); ``None`` when it ran out of time."""
    from memfit.remat.core.errors import SearchLimit
    from memfit.remat.core.solvers.exact import exact_min_peak, exact_sequence

    t0 = time.perf_counter()
    try:
        seq = exact_sequence(g, budget, time_limit=time_limit)
        if seq is not None:
            return 0, seq
        # the least peak is the slow search (it exhausts every state below it): a short box, then the
        # heuristics' least peak takes over
        left = min(time_limit - (time.perf_counter() - t0), 2.0)
        mp, mseq = exact_min_peak(g, time_limit=max(left, 0.05))
    except SearchLimit:
        return None
    g._cache["budget:min-peak"] = (mp, mseq, True)
    return mp, None


def _milp_sequence(g: Graph, budget: int, time_limit: float) -> list[int] | None:
    """The MILP's best compute sequence within ``time_limit`` seconds, or ``None`` (no incumbent)."""
    import numpy as np

    from memfit.remat.core.solvers.milp import _run

    if time_limit <= 0.05:
        return None
    bld, res = _run(g, float(budget), False, time_limit, 1e-6)
    if res.x is None:
        return None
    return list(bld.computes(np.asarray(res.x)))


def _local_search(
    g: Graph,
    budget: int,
    rounds: int,
    deadline: float,
    offer: Callable[[str, list[int] | None], None],
    current: Callable[[], tuple[float, str, list[int]] | None],
) -> None:
    """Forbid evicting one recomputed value at a time; keep the set that lowers the cost."""
    keep: list[int] = []
    for _ in range(rounds):
        cur = current()
        assert cur is not None
        seen: dict[int, int] = {}
        for v in cur[2]:
            seen[v] = seen.get(v, 0) + 1
        recomputed = sorted((v for v, k in seen.items() if k > 1), key=lambda v: -g.cost(v) * seen[v])
        improved = False
        for v in recomputed:
            if time.perf_counter() > deadline:
                return
            if v in keep:
                continue
            before = current()
            for a in _ALPHAS[:2]:
                offer(f"evict(alpha={a}, search)", evict_run(g, budget, alpha=a, keep=[*keep, v]))
            after = current()
            if after is not None and before is not None and after[0] < before[0] - 1e-12:
                keep.append(v)
                improved = True
        if not improved:
            return


def min_peak_budget(
    g: Graph,
    *,
    iters: int = 40,
    deadline: float = float("inf"),
    stage_nodes: int = 40,
    exact_nodes: int = 32,
    keep_sets: Mapping[str, Iterable[int]] | None = None,
) -> int:
    """The smallest budget at which this solver finds a schedule: on graphs of at most ``exact_nodes`` needed
    nodes the least peak over all schedules (:func:`.exact.exact_min_peak`, when it answers within 3 s or the
    deadline); otherwise the least peak of the eviction run (bisecting the budget), the structured candidates
    and, on graphs of at most ``stage_nodes`` nodes, the annealing over keep-sets -- an upper bound on the true
    least peak, and one this solver meets (solving again at it returns that schedule)."""
    return _min_peak_search(
        g,
        iters=iters,
        deadline=deadline,
        stage_nodes=stage_nodes,
        exact_nodes=exact_nodes,
        keep_sets=keep_sets,
    )[0]


def _min_peak_search(
    g: Graph,
    *,
    iters: int = 40,
    deadline: float = float("inf"),
    stage_nodes: int = 40,
    exact_nodes: int = 32,
    keep_sets: Mapping[str, Iterable[int]] | None = None,
) -> tuple[int, list[int]]:
    """:func:`min_peak_budget` and a compute sequence that reaches it; the pair is cached on the graph, and
    :func:`solve_budget` offers that sequence at any budget it fits, so a reported least peak is always met."""
    cached = g._cache.get("budget:min-peak")
    if cached is not None:
        return cached[0], list(cached[1])
    if exact_nodes and len(g.needed()) <= exact_nodes:
        from memfit.remat.core.errors import SearchLimit
        from memfit.remat.core.solvers.exact import exact_min_peak

        try:
            mp, mseq = exact_min_peak(g, time_limit=max(0.05, min(2.0, deadline - time.perf_counter())))
        except SearchLimit:
            pass
        else:
            g._cache["budget:min-peak"] = (mp, mseq, True)
            return mp, list(mseq)
    best_seq = noremat_order(g)
    hi = seq_peak(g, best_seq)
    lo = lower_bound(g) - 1  # infeasible for sure below the lower bound
    for _name, seq in [*_structured_candidates(g, hi, deadline), *_keep_candidates(g, keep_sets)]:
        if seq_peak(g, seq) < hi:
            hi, best_seq = seq_peak(g, seq), seq
    if stage_nodes and len(g) <= stage_nodes:
        peak, seq = stage_min_peak(g, deadline=deadline)
        if peak < hi:
            hi, best_seq = peak, seq
    for _ in range(iters):
        if hi - lo <= max(1, hi // 1000) or time.perf_counter() > deadline:
            break
        mid = (lo + hi) // 2
        ok = False
        for r in range(6):
            run = evict_run(g, mid, alpha=_ALPHAS[r % 3], noise=0.7 if r >= 3 else 0.0, seed=r)
            if run is not None and seq_peak(g, run) <= mid:
                hi, best_seq = seq_peak(g, run), run
                ok = True
                break
        if not ok:
            lo = mid
    # remembered even when the clock cut the search short: a least peak this solver reported, it meets again
    g._cache["budget:min-peak"] = (hi, list(best_seq), False)
    return hi, best_seq
