"""The torch-free core of rematerialization: graphs of values, schedules, and the solvers.

Nothing under ``memfit.remat.core`` imports torch (a test checks ``sys.modules`` in a fresh process): the
solvers are pure Python with numpy, scipy (HiGHS) and networkx, and are tested on synthetic graphs.

- :mod:`.graph` -- :class:`Graph`: nodes are values with bytes, cost, deps and flags.
- :mod:`.schedule` -- :class:`Schedule`: ``compute``/``free`` events; ``simulate()`` and ``validate()``.
- :mod:`.graphs` -- synthetic graphs (chains, training steps, graphs of known treewidth).
- :mod:`.solve` -- :func:`solve`, one entry point over :mod:`.solvers`.
- :mod:`.errors` -- :class:`GraphError`, :class:`ScheduleError`, :class:`InfeasibleBudget`, :class:`SearchLimit`.
"""

from memfit.remat.core import graphs
from memfit.remat.core.errors import GraphError, InfeasibleBudget, ScheduleError, SearchLimit
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule, Simulation
from memfit.remat.core.solve import METHODS, solve

__all__ = [
    "METHODS",
    "Graph",
    "GraphError",
    "InfeasibleBudget",
    "Schedule",
    "ScheduleError",
    "SearchLimit",
    "Simulation",
    "graphs",
    "solve",
]
