"""The no-remat baseline: compute every needed node once, in topological order, free at last use.

This is what autograd does; its cost is the least any schedule can have (every needed node at
least once), and its peak is the reference a fractional budget is measured against.
"""

from __future__ import annotations

from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import noremat_order, to_schedule

__all__ = ["solve_noremat"]


def solve_noremat(g: Graph, budget: int | None) -> Schedule:
    """Topological order, each value freed right after its last use.

    Raises:
        InfeasibleBudget: the no-remat peak exceeds ``budget`` (``min_peak`` is that peak).
    """
    s = to_schedule(g, noremat_order(g), method="noremat", budget=budget)
    peak = s.simulate().peak
    if budget is not None and peak > budget:
        raise InfeasibleBudget(budget=budget, min_peak=peak, method="noremat")
    return s
