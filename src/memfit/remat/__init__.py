"""Rematerialization: graphs of values, schedules that recompute instead of keep, and solvers.

Torch-free core (pure Python + numpy/scipy/networkx). Build a :class:`Graph`, call :func:`solve`
with a byte budget, get a :class:`Schedule` of ``compute``/``free`` events whose simulated peak
fits the budget::

    g = memfit.remat.graphs.chain(64)
    s = memfit.remat.solve(g, budget=0.3)  # 30% of the no-remat peak
    sim = s.simulate()                       # peak bytes, cost, computes, memory timeline

Solvers: ``noremat``, ``checkpoint`` (sqrt(n) segments), ``twremat`` (Kumar et al. 2019),
``milp`` (Checkmate, optimal within its formulation), ``budget`` (default), ``dtr`` (baseline).
See ``docs/remat.md``.
"""

from memfit.remat import graphs
from memfit.remat._errors import GraphError, InfeasibleBudget, ScheduleError
from memfit.remat._graph import Graph
from memfit.remat._schedule import Schedule, Simulation
from memfit.remat._solve import METHODS, solve

__all__ = [
    "METHODS",
    "Graph",
    "GraphError",
    "InfeasibleBudget",
    "Schedule",
    "ScheduleError",
    "Simulation",
    "graphs",
    "solve",
]

# The PyTorch front end (capture a model's training step, lower a schedule to fx, run it) imports torch, so it
# is loaded on first use: the solvers above stay importable without torch.
_TORCH_API = {
    "compile": "memfit.remat._api",
    "RematStep": "memfit.remat._api",
    "RematPlan": "memfit.remat._api",
    "capture": "memfit.remat._capture",
    "CapturedStep": "memfit.remat._capture",
    "UnsupportedGraph": "memfit.remat._capture",
    "Rates": "memfit.remat._capture",
    "calibrate": "memfit.remat._capture",
    "lower": "memfit.remat._lower",
    "backend": "memfit.remat._inductor",
    "MemfitBackend": "memfit.remat._inductor",
    "CompiledPlan": "memfit.remat._inductor",
}
__all__ += list(_TORCH_API)


def __getattr__(name: str) -> object:
    if name in _TORCH_API:
        import importlib

        return getattr(importlib.import_module(_TORCH_API[name]), name)
    raise AttributeError(f"module 'memfit.remat' has no attribute {name!r}")
