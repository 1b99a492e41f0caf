"""Rematerialization: graphs of values, schedules that recompute instead of keep, and solvers.

Layout (see ``docs/architecture.md``): ``core/`` is the torch-free core (pure Python + numpy/scipy/networkx:
graph, schedule, solvers); ``eager/`` captures a training step and runs a schedule as an fx graph;
``compiled/`` hands the solver's choice to ``torch.compile`` (AOTAutograd's partition step).

The core: build a :class:`Graph`, call :func:`solve` with a byte budget, get a :class:`Schedule` of ``compute``/``free`` events whose simulated peak
fits the budget::

    g = memfit.remat.graphs.chain(64)
    s = memfit.remat.solve(g, budget=0.3)  # 30% of the no-remat peak
    sim = s.simulate()                       # peak bytes, cost, computes, memory timeline

Solvers: ``noremat``, ``checkpoint`` (sqrt(n) segments), ``twremat`` (Kumar et al. 2019),
``milp`` (Checkmate: optimal for the given topological order and stage structure), ``exact`` (optimal over all
schedules, small graphs), ``budget`` (default), ``dtr`` (baseline).
See ``docs/remat.md``.
"""

from memfit.remat.core import (
    METHODS,
    Graph,
    GraphError,
    InfeasibleBudget,
    Schedule,
    ScheduleError,
    Simulation,
    graphs,
    solve,
)

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
    "compile": "memfit.remat.eager.step",
    "RematStep": "memfit.remat.eager.step",
    "RematPlan": "memfit.remat.eager.step",
    "capture": "memfit.remat.eager.capture",
    "CapturedStep": "memfit.remat.eager.capture",
    "UnsupportedGraph": "memfit.remat.eager.capture",
    "Rates": "memfit.remat.eager.costs",
    "calibrate": "memfit.remat.eager.costs",
    "lower": "memfit.remat.eager.lower",
    "backend": "memfit.remat.compiled.backend",
    "MemfitBackend": "memfit.remat.compiled.backend",
    "CompiledPlan": "memfit.remat.compiled.backend",
}
__all__ += list(_TORCH_API)


def __getattr__(name: str) -> object:
    if name in _TORCH_API:
        import importlib

        return getattr(importlib.import_module(_TORCH_API[name]), name)
    raise AttributeError(f"module 'memfit.remat' has no attribute {name!r}")
