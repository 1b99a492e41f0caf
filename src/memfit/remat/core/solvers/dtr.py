"""A DTR-style baseline: evict by ``cost / (bytes * staleness)`` without looking ahead.

Dynamic Tensor Rematerialization (Kirisame et al., ICLR 2021) decides online: when memory runs out
it evicts the resident value with the least recompute cost per byte and per step since its last
use, and recomputes evicted values when they are read. This is the same executor the ``budget``
solver uses (:mod:`._evict`), with staleness in place of the distance to the next use.
"""

from __future__ import annotations

from memfit.remat.core.errors import InfeasibleBudget
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import noremat_order, to_schedule
from memfit.remat.core.solvers._evict import evict_run
from memfit.remat.core.solvers._improve import seq_peak

__all__ = ["solve_dtr"]


def solve_dtr(g: Graph, budget: int | None) -> Schedule:
    """The DTR-style schedule within ``budget`` bytes.

    Raises:
        InfeasibleBudget: DTR got stuck (``min_peak`` is the no-remat peak or a lower one it reached).
    """
    if budget is None:
        return to_schedule(g, noremat_order(g), method="dtr", budget=None)
    seq = evict_run(g, budget, policy="dtr")
    if seq is None or seq_peak(g, seq) > budget:
        hi = seq_peak(g, noremat_order(g))
        raise InfeasibleBudget(budget=budget, min_peak=hi, method="dtr")
    return to_schedule(g, seq, method="dtr", budget=budget)
