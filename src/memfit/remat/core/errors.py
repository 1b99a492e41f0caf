"""Errors raised by the rematerialization core.

Every error carries the numbers a caller needs to fix the call: the bad node or event, the budget
that was asked for and the smallest peak a solver could reach.
"""

from __future__ import annotations

__all__ = ["GraphError", "InfeasibleBudget", "ScheduleError", "SearchLimit"]


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


def _fmt(n: float) -> str:
    """Bytes as a short human figure (B, KiB, MiB, GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n):,} B"


class InfeasibleBudget(Exception):
    """No schedule the solver can find fits the memory budget.

    The message gives the budget and the least memory reached, each in bytes and as a fraction (see
    ``docs/remat.md``: a fraction is bytes / ``reference_bytes``, the peak of the same step without
    recomputation, counted over the same memory the budget counts), what recomputation cannot reduce, and what
    to try.

    Attributes:
        budget: the budget that was asked for, in bytes.
        min_peak_bytes: the smallest peak (bytes) the solver reached on this graph; a budget of at least this many
            bytes is feasible for the same solver. ``min_peak`` is the same number (older name).
        method: the solver that gave up.
        reference_bytes: what fractions are taken of (``None`` where the caller did not say).
        fraction: ``budget / reference_bytes`` (``None`` without a reference).
        min_fraction: ``min_peak_bytes / reference_bytes`` (``None`` without a reference).
        fixed: bytes that no schedule can reduce, by what they are (e.g. ``{"gradients": ...}``), as far as the
            caller knows them.
    """

    def __init__(
        self,
        *,
        budget: int,
        min_peak: int,
        method: str,
        reason: str = "",
        reference_bytes: int | None = None,
        fixed: dict[str, int] | None = None,
        counted: str = "",
    ) -> None:
        self.budget = int(budget)
        self.min_peak_bytes = int(min_peak)
        self.method = method
        self.reason = reason
        self.reference_bytes = None if reference_bytes is None else int(reference_bytes)
        self.fixed = dict(fixed or {})
        self.counted = counted
        ref = self.reference_bytes
        self.fraction = self.budget / ref if ref else None
        self.min_fraction = self.min_peak_bytes / ref if ref else None
        super().__init__(self._message())

    @property
    def min_peak(self) -> int:
        """The same as :attr:`min_peak_bytes`."""
        return self.min_peak_bytes

    def _message(self) -> str:
        def both(n: int, frac: float | None) -> str:
            s = f"{_fmt(n)} ({n:,} bytes"
            return s + (f", {frac:.3f} of no-remat)" if frac is not None else ")")

        what = f" of {self.counted}" if self.counted else ""
        lines = [
            f"{self.method}: no schedule fits a budget of {both(self.budget, self.fraction)}{what}; the least "
            f"memory it reaches is {both(self.min_peak_bytes, self.min_fraction)}."
        ]
        if self.reference_bytes:
            lines.append(f"Without recomputation the peak is {_fmt(self.reference_bytes)}.")
        if self.reason:
            lines.append(self.reason[0].upper() + self.reason[1:] + ".")
        if self.fixed:
            parts = ", ".join(f"{k} {_fmt(v)}" for k, v in self.fixed.items() if v)
            if parts:
                lines.append(f"Recomputation cannot reduce: {parts}.")
        tries = []
        if self.min_fraction is not None:
            need = min(1.0, self.min_fraction + 0.0005)
            tries.append(f"budget={need:.3f} or more (a fraction)")
        tries.append(f"budget={self.min_peak_bytes:,} or more (bytes)")
        tries.append('budget="min" (the least-memory schedule)')
        if self.method not in ("exact", "budget"):
            tries.append('method="budget"')
        lines.append("Try " + ", ".join(tries) + "; or a smaller batch.")
        return " ".join(lines)


class SearchLimit(RuntimeError):
    """An exact search gave up: the graph is too large for an answer within its limits.

    Attributes:
        method: the solver (``"exact"``).
        nodes: needed nodes in the graph.
        states: states expanded before it stopped (0 when refused up front by ``max_nodes``).
    """

    def __init__(
        self,
        *,
        method: str,
        nodes: int,
        states: int,
        limit_states: int,
        time_limit: float,
        max_nodes: int | None = None,
    ) -> None:
        self.method = method
        self.nodes = nodes
        self.states = states
        if max_nodes is not None:
            msg = (
                f"{method}: the graph has {nodes} nodes to schedule, more than max_nodes={max_nodes}; an exact "
                'search grows exponentially with them. Use method="budget" (or raise max_nodes).'
            )
        else:
            msg = (
                f"{method}: no answer after {states:,} states (limits: max_states={limit_states:,}, "
                f'time_limit={time_limit:g} s) on a graph of {nodes} nodes to schedule. Use method="budget", '
                "or raise max_states and time_limit."
            )
        super().__init__(msg)
