"""``solve``: one entry point for every rematerialization solver."""

from __future__ import annotations

from typing import Any, Literal

from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import lower_bound, noremat_order, profile, resolve_budget

__all__ = ["METHODS", "solve"]

Method = Literal["noremat", "checkpoint", "twremat", "milp", "budget", "dtr", "exact"]
METHODS: tuple[str, ...] = ("noremat", "checkpoint", "twremat", "milp", "budget", "dtr", "exact")


def solve(
    g: Graph, budget: int | float | Literal["min"] | None = None, method: Method = "budget", **options: Any
) -> Schedule:
    """Find a schedule for ``g`` whose simulated peak is at most ``budget``.

    Args:
        g: the graph.
        budget: bytes of total peak (int), a fraction in (0, 1] of the no-remat peak (float),
            ``"min"`` for the least peak the solver reaches (and the cheapest schedule it finds there),
            or ``None`` for no limit.
        method: ``"noremat"``, ``"checkpoint"``, ``"twremat"``, ``"milp"``, ``"budget"`` (default),
            ``"dtr"`` or ``"exact"``; see each solver's docstring for its options.
        **options: passed to the solver (e.g. ``depth=`` for twremat, ``time_limit=`` for milp).

    Returns:
        A valid :class:`Schedule` (validated by the simulator) with peak <= budget.

    Raises:
        InfeasibleBudget: the solver found no schedule within the budget; the message and the
            attributes ``min_peak_bytes`` / ``min_fraction`` say how low it got.
        SearchLimit: ``method="exact"`` on a graph too large for it.
        GraphError: the graph has no outputs.
        ValueError: an unknown method or option, or a malformed budget.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    g.needed()  # raises GraphError for a graph without outputs
    if isinstance(budget, str):
        if budget != "min":
            raise ValueError(f'a str budget must be "min", got {budget!r}')
        return _solve_min(g, method, options)
    b = resolve_budget(g, budget, method=method)
    try:
        s = _dispatch(g, b, method, options)
    except InfeasibleBudget as e:
        assert b is not None
        ref = int(profile(g, noremat_order(g)).max(initial=g.input_bytes))
        reason = f"the inputs alone hold {g.input_bytes:,} bytes" if b < g.input_bytes else e.reason
        fixed = {
            "inputs": g.input_bytes,
            "outputs": sum(g.nbytes(v) for v in g.outputs if not g.is_input(v)),
        }
        raise InfeasibleBudget(
            budget=b,
            min_peak=e.min_peak_bytes,
            method=e.method,
            reason=reason,
            reference_bytes=ref,
            fixed=fixed,
            counted="the graph's bytes (inputs included)",
        ) from None
    sim = s.simulate()  # validates; the simulator is the single source of truth
    if b is not None and sim.peak > b:
        raise AssertionError(f"{method} returned a schedule over budget ({sim.peak} > {b}); this is a bug")
    return s


def _solve_min(g: Graph, method: str, options: dict[str, Any]) -> Schedule:
    """``budget="min"``: the least peak ``method`` reaches, then its cheapest schedule there. Every solver
    reports, when a budget is infeasible, a least peak that it meets again (``InfeasibleBudget.min_peak``);
    the lower bound below which no schedule exists is the first budget asked."""
    if method == "exact":
        from memfit.remat.core.solvers.exact import exact_min_peak

        mp, _ = exact_min_peak(g, **options)
        return solve(g, mp, method="exact", **options)
    if method == "budget":
        from memfit.remat.core.solvers.budget import min_peak_budget

        mp = min_peak_budget(g, keep_sets=options.get("keep_sets"))
        return solve(g, mp, method="budget", **options)
    try:
        return solve(g, lower_bound(g), method=method, **options)  # type: ignore[arg-type]
    except InfeasibleBudget as e:
        return solve(g, e.min_peak_bytes, method=method, **options)  # type: ignore[arg-type]


def _dispatch(g: Graph, b: int | None, method: str, options: dict[str, Any]) -> Schedule:
    s: Schedule
    if method == "noremat":
        from memfit.remat.core.solvers.noremat import solve_noremat

        _no_options(method, options)
        s = solve_noremat(g, b)
    elif method == "milp":
        from memfit.remat.core.solvers.milp import solve_milp

        s = solve_milp(g, b, **options)
    elif method == "checkpoint":
        from memfit.remat.core.solvers.checkpoint import solve_checkpoint

        s = solve_checkpoint(g, b, **options)
    elif method == "twremat":
        from memfit.remat.core.solvers.twremat import solve_twremat

        s = solve_twremat(g, b, **options)
    elif method == "exact":
        from memfit.remat.core.solvers.exact import solve_exact

        s = solve_exact(g, b, **options)
    elif method == "dtr":
        from memfit.remat.core.solvers.dtr import solve_dtr

        s = solve_dtr(g, b, **options)
    else:
        from memfit.remat.core.solvers.budget import solve_budget

        s = solve_budget(g, b, **options)
    return s


def _no_options(method: str, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(f"method {method!r} takes no options, got {sorted(options)}")
