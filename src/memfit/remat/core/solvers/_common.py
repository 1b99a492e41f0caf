"""Pieces every solver shares: budgets, compute sequences and where their frees go.

Solvers produce a *compute sequence* (the ``compute`` events in order, a value may appear many
times); :func:`to_schedule` places every ``free`` as early as possible -- right after the last
use of that copy of the value, or right after computing it if nothing reads it -- and outputs stay
to the end. Any schedule with the same computes holds a superset of these values at every
compute, so the frees chosen here give the least memory that compute sequence can have; the
solvers therefore only decide *what to compute when*.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Event, Schedule

__all__ = [
    "check_compute_sequence",
    "compute_once",
    "free_points",
    "lower_bound",
    "noremat_order",
    "profile",
    "resolve_budget",
    "to_schedule",
]


def noremat_order(g: Graph) -> list[int]:
    """Every needed non-input node once, in id (topological) order: the no-remat compute sequence."""
    return g.needed()


def free_points(g: Graph, computes: Sequence[int]) -> np.ndarray:
    """For each position ``p`` of the compute sequence, the position after which its value is freed.

    ``-1`` means never (a final copy of an output). Otherwise it is the last position in
    ``[p, next compute of the same value)`` whose compute reads the value, or ``p`` itself.
    """
    m = len(computes)
    out = np.empty(m, dtype=np.int64)
    deps = g._deps
    is_out = g._output
    pending: dict[int, int] = {}  # value -> last use seen (sweeping backwards) in its open residency
    later: set[int] = set()  # values computed again further on
    for q in range(m - 1, -1, -1):
        u = computes[q]
        last = pending.pop(u, -1)
        if u not in later and is_out[u]:
            out[q] = -1
        elif last >= 0:
            out[q] = last
        else:
            out[q] = q
        later.add(u)
        for d in deps[u]:
            if d not in pending:
                pending[d] = q
    return out


def profile(g: Graph, computes: Sequence[int], ends: np.ndarray | None = None) -> np.ndarray:
    """Resident bytes right after each compute, with frees placed by :func:`free_points` (int64[m])."""
    m = len(computes)
    if ends is None:
        ends = free_points(g, computes)
    nbytes, _ = g.arrays()
    idx = np.asarray(computes, dtype=np.int64)
    b = nbytes[idx] if m else np.zeros(0, dtype=np.int64)
    stop = np.where(ends < 0, m, ends + 1)
    diff = np.zeros(m + 1, dtype=np.int64)
    np.add.at(diff, np.arange(m), b)
    np.add.at(diff, stop, -b)
    return np.cumsum(diff[:m]) + g.input_bytes


def check_compute_sequence(g: Graph, computes: Sequence[int]) -> None:
    """Raise ``ValueError`` unless every compute's deps were computed before (or are inputs)."""
    seen = list(g._input)
    for q, v in enumerate(computes):
        if g._input[v]:
            raise ValueError(f"compute sequence position {q}: {g.name(v)!r} is an input")
        for d in g._deps[v]:
            if not seen[d]:
                raise ValueError(
                    f"compute sequence position {q}: {g.name(v)!r} reads {g.name(d)!r} before it exists"
                )
        seen[v] = True


def to_schedule(g: Graph, computes: Sequence[int], *, method: str, budget: int | None) -> Schedule:
    """The schedule with these computes and the earliest frees (see :func:`free_points`)."""
    ends = free_points(g, computes)
    frees_after: dict[int, list[int]] = {}
    for p, e in enumerate(ends.tolist()):
        if e >= 0:
            frees_after.setdefault(e, []).append(computes[p])
    events: list[Event] = []
    for q, v in enumerate(computes):
        events.append(("compute", v))
        for u in frees_after.get(q, ()):
            events.append(("free", u))
    return Schedule(g, events, method=method, budget=budget)


def resolve_budget(g: Graph, budget: int | float | None, *, method: str) -> int | None:
    """Turn ``budget`` into bytes: an int is bytes, a float in (0, 1] a fraction of the no-remat peak.

    Raises:
        ValueError: a float outside (0, 1], a negative int, or another type.
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise ValueError(f"budget must be an int (bytes), a float in (0, 1] or None, got {budget!r}")
    if isinstance(budget, (int, np.integer)):
        b = int(budget)
        if b < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {b}")
    elif isinstance(budget, (float, np.floating)):
        f = float(budget)
        if not 0.0 < f <= 1.0:
            raise ValueError(
                f"a float budget is a fraction of the no-remat peak and must be in (0, 1], got {f}; "
                "pass bytes as an int"
            )
        peak = int(profile(g, noremat_order(g)).max(initial=g.input_bytes))
        b = int(f * peak)
    else:
        raise ValueError(f"budget must be an int (bytes), a float in (0, 1] or None, got {budget!r}")
    return b


def compute_once(g: Graph, seq: Sequence[int]) -> list[int]:
    """Drop the second and later computes of non-recomputable nodes: the first copy stays resident
    until its last read instead (valid, possibly more memory), for solvers that ignore the flag."""
    if all(g._recomputable):
        return list(seq)
    seen: set[int] = set()
    out: list[int] = []
    for v in seq:
        if not g._recomputable[v]:
            if v in seen:
                continue
            seen.add(v)
        out.append(v)
    return out


def lower_bound(g: Graph) -> int:
    """A peak no schedule can beat: inputs plus, for the largest needed node, itself and its deps."""
    base = g.input_bytes
    best = base
    for v in g.needed():
        s = base + g._bytes[v] + sum(g._bytes[d] for d in g._deps[v] if not g._input[d])
        best = max(best, s)
    return max(best, base + sum(g._bytes[v] for v in g.outputs if not g._input[v]))
