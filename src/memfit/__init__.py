"""memfit: train deep networks in less memory, and see what it costs in time.

Subpackages (imported on first use, so that ``memfit.remat``'s torch-free core stays torch-free):

- :mod:`memfit.memory` -- measure live memory of a training step by category.
- :mod:`memfit.optim` -- SM3 (sublinear-state adaptive optimizer) and the count-sketch baseline.
- :mod:`memfit.remat` -- rematerialization graphs, schedules and solvers (TwRemat, MILP, budget).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"
__all__ = ["__version__", "memory", "optim", "remat"]

_SUBPACKAGES = ("memory", "optim", "remat")


def __getattr__(name: str) -> ModuleType:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"memfit.{name}")
    raise AttributeError(f"module 'memfit' has no attribute {name!r}")
