"""``solve``: one entry point for every rematerialization solver."""

from __future__ import annotations

from typing import Any, Literal

from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import resolve_budget

__all__ = ["METHODS", "solve"]

Method = Literal["noremat", "checkpoint", "twremat", "milp", "budget", "dtr"]
METHODS: tuple[str, ...] = ("noremat", "checkpoint", "twremat", "milp", "budget", "dtr")


def solve(g: Graph, budget: int | float | None = None, method: Method = "budget", **options: Any) -> Schedule:
    """Find a schedule for ``g`` whose simulated peak is at most ``budget``.

    Args:
        g: the graph.
        budget: bytes of total peak (int), a fraction in (0, 1] of the no-remat peak (float), or
            ``None`` for no limit.
        method: ``"noremat"``, ``"checkpoint"``, ``"twremat"``, ``"milp"``, ``"budget"`` (default) or
            ``"dtr"``; see each solver's docstring for its options.
        **options: passed to the solver (e.g. ``depth=`` for twremat, ``time_limit=`` for milp).

    Returns:
        A valid :class:`Schedule` (validated by the simulator) with peak <= budget.

    Raises:
        InfeasibleBudget: the solver found no schedule within the budget (``min_peak`` says how
            low it got).
        GraphError: the graph has no outputs.
        ValueError: an unknown method or option, or a malformed budget.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    g.needed()  # raises GraphError for a graph without outputs
    b = resolve_budget(g, budget, method=method)
    try:
        s = _dispatch(g, b, method, options)
    except InfeasibleBudget as e:
        if b is not None and b < g.input_bytes:
            raise InfeasibleBudget(
                budget=b,
                min_peak=e.min_peak,
                method=method,
                reason=f"the inputs alone hold {g.input_bytes:,} bytes",
            ) from None
        raise
    sim = s.simulate()  # validates; the simulator is the single source of truth
    if b is not None and sim.peak > b:
        raise AssertionError(f"{method} returned a schedule over budget ({sim.peak} > {b}); this is a bug")
    return s


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
