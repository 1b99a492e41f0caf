"""Schedules: ordered ``compute`` / ``free`` events, and the simulator that measures them.

The simulator is the single source of truth for peak memory and cost; every solver's output is
measured by it. Semantics (shared by all solvers and tests):

- Inputs are resident from the start to the end, count toward memory, never appear in events.
- ``("compute", v)``: every dep of ``v`` is resident and ``v`` is not; afterwards ``v`` is resident.
  Memory is measured right after each compute, so the deps and the new value are all counted.
- ``("free", v)``: ``v`` is resident and not an input.
- At the end every output is resident; a node with ``recomputable=False`` is computed at most once.
- Peak = max(input bytes, memory after each compute). Cost = sum of the costs of the computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from memfit.remat.core.errors import ScheduleError
from memfit.remat.core.graph import Graph

__all__ = ["Event", "Schedule", "Simulation"]

Event = tuple[Literal["compute", "free"], int]


@dataclass(frozen=True)
class Simulation:
    """What :meth:`Schedule.simulate` measured.

    Attributes:
        peak: peak resident bytes (inputs included).
        cost: sum of costs of all computes.
        computes: number of compute events.
        memory: resident bytes right after each event (int64, one entry per event).
    """

    peak: int
    cost: float
    computes: int
    memory: np.ndarray = field(repr=False)


class Schedule:
    """An ordered list of ``("compute", v)`` / ``("free", v)`` events for a :class:`Graph`.

    Attributes:
        graph: the graph it schedules.
        events: the events, in order.
        method: the solver that produced it (informational).
        budget: the byte budget it was solved for (``None``: no limit).
        info: solver facts (e.g. ``optimal``, ``solve_time_s``, the candidate ``budget`` chose).
    """

    def __init__(
        self,
        graph: Graph,
        events: Iterable[Event],
        *,
        method: str = "",
        budget: int | None = None,
    ) -> None:
        self.graph = graph
        self.events: list[Event] = list(events)
        self.method = method
        self.budget = budget
        self.info: dict[str, Any] = {}
        self._sim: Simulation | None = None

    def __repr__(self) -> str:
        s = self.simulate()
        return (
            f"Schedule(method={self.method!r}, {len(self.events)} events, peak={s.peak:,} B, "
            f"cost={s.cost:.4g}, computes={s.computes})"
        )

    def __len__(self) -> int:
        return len(self.events)

    @property
    def peak(self) -> int:
        """Simulated peak bytes."""
        return self.simulate().peak

    @property
    def cost(self) -> float:
        """Simulated total cost."""
        return self.simulate().cost

    def validate(self) -> None:
        """Check the schedule against the semantics.

        Raises:
            ScheduleError: naming the first bad event (or the missing outputs at the end).
        """
        self._run(check=True)

    def simulate(self) -> Simulation:
        """Peak bytes, total cost, number of computes and the memory after every event.

        The schedule is validated on the way (a simulation of an invalid schedule is meaningless).

        Raises:
            ScheduleError: as :meth:`validate`.
        """
        if self._sim is None:
            self._sim = self._run(check=True)
        return self._sim

    def _run(self, *, check: bool) -> Simulation:
        g = self.graph
        n = len(g)
        nbytes = g._bytes
        costs = g._cost
        deps = g._deps
        is_input = g._input
        recomputable = g._recomputable
        resident = list(is_input)
        computed = [False] * n
        mem = g.input_bytes
        peak = mem
        total = 0.0
        computes = 0
        memory = np.empty(len(self.events), dtype=np.int64)
        for i, ev in enumerate(self.events):
            try:
                kind, v = ev
            except (TypeError, ValueError):
                raise ScheduleError(f"event {i}: expected (kind, node), got {ev!r}", index=i) from None
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n:
                raise ScheduleError(f"event {i}: {ev!r} names no node (ids 0..{n - 1})", index=i)
            if kind == "compute":
                if is_input[v]:
                    raise ScheduleError(f"event {i}: compute {g.name(v)!r}: it is an input", index=i)
                if resident[v]:
                    raise ScheduleError(f"event {i}: compute {g.name(v)!r}: it is already resident", index=i)
                if computed[v] and not recomputable[v]:
                    raise ScheduleError(
                        f"event {i}: compute {g.name(v)!r}: it is not recomputable and was computed before",
                        index=i,
                    )
                for d in deps[v]:
                    if not resident[d]:
                        raise ScheduleError(
                            f"event {i}: compute {g.name(v)!r}: its dep {g.name(d)!r} is not resident",
                            index=i,
                        )
                resident[v] = True
                computed[v] = True
                mem += nbytes[v]
                total += costs[v]
                computes += 1
                if mem > peak:
                    peak = mem
            elif kind == "free":
                if is_input[v]:
                    raise ScheduleError(f"event {i}: free {g.name(v)!r}: inputs are never freed", index=i)
                if not resident[v]:
                    raise ScheduleError(f"event {i}: free {g.name(v)!r}: it is not resident", index=i)
                resident[v] = False
                mem -= nbytes[v]
            else:
                raise ScheduleError(f"event {i}: unknown kind {kind!r} (use 'compute' or 'free')", index=i)
            memory[i] = mem
        missing = [g.name(v) for v in range(n) if g._output[v] and not resident[v]]
        if missing:
            raise ScheduleError(
                f"outputs not resident at the end: {missing[:8]}{' ...' if len(missing) > 8 else ''}",
                index=len(self.events),
            )
        return Simulation(peak=int(peak), cost=float(total), computes=computes, memory=memory)

    def names(self) -> list[tuple[str, str]]:
        """The events with node names instead of ids (for printing)."""
        return [(k, self.graph.name(v)) for k, v in self.events]

    def to_list(self) -> list[list[str | int]]:
        """JSON-ready ``[[kind, id], ...]``."""
        return [[k, int(v)] for k, v in self.events]


def events_from_names(graph: Graph, events: Sequence[tuple[str, str]]) -> list[Event]:
    """Translate ``(kind, name)`` events into ``(kind, id)`` events."""
    out: list[Event] = []
    for kind, name in events:
        if kind not in ("compute", "free"):
            raise ScheduleError(f"unknown kind {kind!r}", index=len(out))
        out.append((kind, graph.id(name)))  # type: ignore[arg-type]
    return out
