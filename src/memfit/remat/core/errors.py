"""Errors raised by the rematerialization core.

Every error carries the numbers a caller needs to fix the call: the bad node or event, the budget
that was asked for and the smallest peak a solver could reach.
"""

from __future__ import annotations

__all__ = ["GraphError", "InfeasibleBudget", "ScheduleError"]


class GraphError(ValueError):
    """A graph is malformed: a cycle, an unknown dependency, a negative size, a duplicate name."""


class ScheduleError(ValueError):
    """A schedule breaks the semantics; the message names the first bad event.

    Attributes:
        index: position of the first bad event in ``Schedule.events`` (``len(events)`` when the
            schedule is fine event by event but an output is not resident at the end).
    """

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


class InfeasibleBudget(Exception):
    """No schedule the solver can find fits the memory budget.

    Attributes:
        budget: the budget that was asked for, in bytes.
        min_peak: the smallest peak (bytes) the solver could reach on this graph; a budget of at
            least this many bytes is feasible for the same solver.
        method: the solver that gave up.
    """

    def __init__(self, *, budget: int, min_peak: int, method: str, reason: str = "") -> None:
        self.budget = int(budget)
        self.min_peak = int(min_peak)
        self.method = method
        msg = (
            f"{method}: no schedule fits a budget of {self.budget:,} bytes; the smallest peak "
            f"it reached is {self.min_peak:,} bytes"
        )
        if reason:
            msg += f" ({reason})"
        super().__init__(msg + ". Raise the budget to at least min_peak or use another method.")
