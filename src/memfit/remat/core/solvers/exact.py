"""The exact solver: the least-cost schedule over *all* schedules, by A* over resident sets (small graphs).

Every other solver restricts the schedules it considers (a topological order and a stage structure for the MILP,
eviction heuristics for ``budget``); this one does not, so it is the oracle they are tested against.

Search space. A state is ``(R, E)``: ``R`` the set of resident non-input values, ``E`` the non-recomputable
values computed so far (bitsets as Python ints over the needed nodes). A move computes a value ``v`` with all its
deps in ``R`` (``v`` not in ``R``; a non-recomputable ``v`` not in ``E``) at cost ``c_v`` if the memory right
after it, ``inputs + bytes(R) + b_v``, is within the budget, and then frees any subset of ``v``'s deps. The goal:
every output resident. Restricting frees to "right after a compute, of values it read" loses nothing: given any
valid schedule, moving each free to right after the last read of that copy of the value (:func:`._common.
free_points`) keeps it valid and never raises the memory at a compute, so some optimal schedule has this form.
Two further reductions that keep an optimum: a value of 0 bytes is never freed (keeping it costs nothing and
saves recomputing it), and a value is never freed right after its own compute (a value nobody read is useless).

Bound. ``h(R)`` = the summed cost of the values that must still be computed at least once: the non-resident
outputs and, recursively, the non-resident deps of those values (a value is computed only when its deps are
resident). It is admissible and consistent (computing ``v`` takes ``v`` out of that set and adds nothing that
was reachable only through ``v``: ``v``'s deps are resident), so A* returns an optimum. A state whose set
holds a non-recomputable value already computed is dead. The least peak (:func:`exact_min_peak`) is the same
search with the path's maximum memory as its length (a bottleneck path), bounded below by the largest working
set (value plus deps) among the values still to compute.

Limits: the number of states grows exponentially with the graph; past ``max_states`` expanded states or
``time_limit`` seconds the search stops with :class:`.errors.SearchLimit` (about 25-30 needed nodes answer in
seconds at any budget on training-step graphs; ``max_nodes`` refuses larger graphs up front).
"""

from __future__ import annotations

import heapq
import time

from memfit.remat.core.errors import InfeasibleBudget, SearchLimit
from memfit.remat.core.graph import Graph
from memfit.remat.core.schedule import Schedule
from memfit.remat.core.solvers._common import noremat_order, profile, to_schedule

__all__ = ["exact_min_peak", "exact_sequence", "solve_exact"]

_EPS = 1e-9


class _Space:
    """The needed nodes as bit positions, with per-node masks and the successor rule."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.nodes = g.needed()
        pos = {v: i for i, v in enumerate(self.nodes)}
        self.n = n = len(self.nodes)
        self.base = g.input_bytes
        self.b = [g.nbytes(v) for v in self.nodes]
        self.c = [g.cost(v) for v in self.nodes]
        self.dep_list = [[pos[d] for d in g.deps(v) if not g.is_input(d)] for v in self.nodes]
        self.dep_mask = [sum(1 << j for j in ds) for ds in self.dep_list]
        self.user_mask = [0] * n
        for i, ds in enumerate(self.dep_list):
            for j in ds:
                self.user_mask[j] |= 1 << i
        self.out = sum(1 << i for i, v in enumerate(self.nodes) if g.is_output(v))
        self.nonrec = sum(1 << i for i, v in enumerate(self.nodes) if not g.is_recomputable(v))
        # outputs that nothing reads: never freed once computed (frees only follow a read)
        self.sticky = sum(1 << i for i, v in enumerate(self.nodes) if g.is_output(v) and not g.users(v))
        # a working set: the value and its deps are resident while it is computed
        self.work = [self.base + self.b[i] + sum(self.b[j] for j in self.dep_list[i]) for i in range(n)]
        # the subsets of each node's (non-zero-byte) deps that may be freed right after it: (mask, bytes)
        self.frees: list[list[tuple[int, int]]] = []
        for i in range(n):
            cand = [j for j in self.dep_list[i] if self.b[j] > 0]
            subs = [(0, 0)]
            for j in cand:
                subs += [(m | 1 << j, fb + self.b[j]) for m, fb in subs]
            self.frees.append(subs)
        self._closure: dict[int, int] = {}
        # byte-wise tables: for each 8-bit slice of a bitset, the summed cost and the largest working set of its
        # members (so a set's totals take n/8 look-ups instead of a loop over its bits)
        self._chunks = (n + 7) // 8
        self._cost_t: list[list[float]] = []
        self._work_t: list[list[int]] = []
        for k in range(self._chunks):
            ct = [0.0] * 256
            wt = [0] * 256
            for x in range(1, 256):
                low = (x & -x).bit_length() - 1
                i = 8 * k + low
                ct[x] = ct[x & (x - 1)] + (self.c[i] if i < n else 0.0)
                wt[x] = max(wt[x & (x - 1)], self.work[i] if i < n else 0)
            self._cost_t.append(ct)
            self._work_t.append(wt)

    def totals(self, m: int) -> tuple[int, float]:
        """(largest working set, summed cost) over the members of bitset ``m``."""
        w = 0
        cs = 0.0
        k = 0
        while m:
            x = m & 255
            if x:
                cs += self._cost_t[k][x]
                wk = self._work_t[k][x]
                if wk > w:
                    w = wk
            m >>= 8
            k += 1
        return w, cs

    def closure(self, r: int) -> int:
        """The values that must still be computed from resident set ``r`` (bitset)."""
        hit = self._closure.get(r)
        if hit is not None:
            return hit
        todo = self.out & ~r
        done = 0
        dep_mask = self.dep_mask
        while todo:
            low = todo & -todo
            todo ^= low
            done |= low
            todo |= dep_mask[low.bit_length() - 1] & ~r & ~done
        if len(self._closure) < 4_000_000:
            self._closure[r] = done
        return done

    def bits(self, m: int) -> list[int]:
        out = []
        while m:
            low = m & -m
            out.append(low.bit_length() - 1)
            m ^= low
        return out

    def mem(self, r: int) -> int:
        return self.base + sum(self.b[i] for i in self.bits(r))


def _search(
    sp: _Space,
    budget: int | None,
    *,
    bottleneck: bool,
    max_states: int,
    deadline: float,
    time_limit: float,
) -> tuple[float, list[int]] | None:
    """A* from the empty resident set to a goal state; ``None`` if no goal is reachable within ``budget``.

    With ``bottleneck`` a path's length is its largest memory, else its cost. Returns the length and the compute
    sequence (bit positions).
    """
    n = sp.n
    full = (1 << n) - 1
    b, c, dep_mask, frees, nonrec, out = sp.b, sp.c, sp.dep_mask, sp.frees, sp.nonrec, sp.out
    sticky = sp.sticky
    user_mask = sp.user_mask
    limit = float("inf") if budget is None else float(budget)
    # per closure: (largest working set among its values, their summed cost)
    hcache: dict[int, tuple[int, float]] = {}

    def h_of(cl: int) -> tuple[int, float]:
        h = hcache.get(cl)
        if h is None:
            h = sp.totals(cl)
            hcache[cl] = h
        return h

    start = 0
    cl0 = sp.closure(0)
    w0, hc0 = h_of(cl0)
    if w0 > limit:
        return None
    # heap entries: (primary, secondary, key, mem, sticky bytes, closure). Primary: f (cost + bound, or max(peak,
    # peak bound)). Secondary: for cost, -g (deeper first among equal f); for the bottleneck, the cost still to
    # pay, so that the search runs towards a goal across the wide plateaus of equal peak (with a consistent
    # bound the first goal popped has the least peak, whatever the order among equal primaries)
    best: dict[int, tuple[float, float]] = {start: (float(sp.base), 0.0)}
    parent: dict[int, tuple[int, int]] = {}
    heap: list[tuple[float, float, int, int, int, int]] = [
        (float(max(sp.base, w0)), hc0, start, sp.base, 0, cl0)
        if bottleneck
        else (hc0, 0.0, start, sp.base, 0, cl0)
    ]
    closed: set[int] = set()
    expanded = 0
    while heap:
        _f, _sec, key, m, sb, cl = heapq.heappop(heap)
        if key in closed:
            continue
        closed.add(key)
        r = key & full
        e = key >> n
        peak, g_cost = best[key]
        if r & out == out:
            seq: list[int] = []
            k = key
            while k != start:
                k, i = parent[k]
                seq.append(i)
            seq.reverse()
            return (peak if bottleneck else g_cost), seq
        expanded += 1
        if expanded > max_states or (expanded & 1023 == 0 and time.perf_counter() > deadline):
            raise SearchLimit(
                method="exact", nodes=n, states=expanded, limit_states=max_states, time_limit=time_limit
            )
        avail = full & ~r
        while avail:
            low = avail & -avail
            avail ^= low
            i = low.bit_length() - 1
            if dep_mask[i] & ~r or low & e:
                continue
            m_after = m + b[i]
            if m_after > limit:
                continue
            ng = g_cost + c[i]
            npeak = max(peak, m_after)
            ne = e | (low & nonrec)
            r_in = r | low
            sb2 = sb + b[i] if low & sticky else sb
            for fmask, fbytes in frees[i]:
                r2 = r_in & ~fmask
                k2 = r2 | ne << n
                if k2 in closed:
                    continue
                old = best.get(k2)
                if old is not None and (old[0] <= npeak if bottleneck else old[1] <= ng + _EPS):
                    continue
                # computing v leaves the values still to compute as they were, less v; a freed value joins them
                # when an output or read by one of them, and brings its own missing deps
                cl2 = cl & ~low
                if fmask:
                    todo = 0
                    fm = fmask
                    while fm:
                        fl = fm & -fm
                        fm ^= fl
                        if fl & out or user_mask[fl.bit_length() - 1] & cl2:
                            todo |= fl
                    while todo:
                        fl = todo & -todo
                        todo ^= fl
                        cl2 |= fl
                        todo |= dep_mask[fl.bit_length() - 1] & ~r2 & ~cl2
                if cl2 & ne:  # a non-recomputable value computed before would have to be computed again
                    continue
                w2, hc2 = h_of(cl2)
                # each value still to compute needs its working set resident, and with it every output that
                # nothing reads (never freed once computed)
                pb = w2 + sb2 if cl2 else 0
                if pb > limit:
                    continue
                best[k2] = (npeak, ng)
                parent[k2] = (key, i)
                if bottleneck:
                    heapq.heappush(heap, (float(max(npeak, pb)), hc2, k2, m_after - fbytes, sb2, cl2))
                else:
                    heapq.heappush(heap, (ng + hc2, -ng, k2, m_after - fbytes, sb2, cl2))
    return None


def exact_sequence(
    g: Graph,
    budget: int,
    *,
    time_limit: float = 30.0,
    max_states: int = 2_000_000,
    max_nodes: int = 48,
) -> list[int] | None:
    """The least-cost compute sequence within ``budget`` bytes over all schedules, or ``None`` if none exists.

    Raises:
        SearchLimit: the graph has more than ``max_nodes`` needed nodes, or the search passed ``max_states``
            expanded states or ``time_limit`` seconds before it could answer.
    """
    sp = _checked_space(g, max_nodes, time_limit, max_states)
    found = _search(
        sp,
        budget,
        bottleneck=False,
        max_states=max_states,
        deadline=time.perf_counter() + time_limit,
        time_limit=time_limit,
    )
    return None if found is None else [sp.nodes[i] for i in found[1]]


def exact_min_peak(
    g: Graph,
    *,
    time_limit: float = 30.0,
    max_states: int = 2_000_000,
    max_nodes: int = 48,
) -> tuple[int, list[int]]:
    """The least peak any schedule reaches, and a compute sequence reaching it (a bottleneck A*).

    Raises:
        SearchLimit: as :func:`exact_sequence`.
    """
    sp = _checked_space(g, max_nodes, time_limit, max_states)
    found = _search(
        sp,
        None,
        bottleneck=True,
        max_states=max_states,
        deadline=time.perf_counter() + time_limit,
        time_limit=time_limit,
    )
    assert found is not None  # without a budget the no-remat order reaches the goal
    seq = [sp.nodes[i] for i in found[1]]
    return int(found[0]), seq


def _checked_space(g: Graph, max_nodes: int, time_limit: float, max_states: int) -> _Space:
    n = len(g.needed())
    if n > max_nodes:
        raise SearchLimit(
            method="exact",
            nodes=n,
            states=0,
            limit_states=max_states,
            time_limit=time_limit,
            max_nodes=max_nodes,
        )
    return _Space(g)


def solve_exact(
    g: Graph,
    budget: int | None,
    *,
    time_limit: float = 30.0,
    max_states: int = 2_000_000,
    max_nodes: int = 48,
) -> Schedule:
    """The least-cost schedule within ``budget`` bytes over all valid schedules (see the module docstring).

    Args:
        g: the graph.
        budget: bytes, or ``None`` (then the no-remat schedule, which computes each needed value once: the least
            cost there is).
        time_limit: seconds before the search gives up with :class:`SearchLimit`.
        max_states: expanded states before it gives up.
        max_nodes: graphs with more needed nodes are refused at once.

    Returns:
        An optimal schedule; ``info["optimal"]`` is True.

    Raises:
        InfeasibleBudget: no schedule at all fits; ``min_peak`` is the least peak over all schedules.
        SearchLimit: the graph is too large for an exact answer within the limits.
    """
    t0 = time.perf_counter()
    base = noremat_order(g)
    if budget is None or int(profile(g, base).max(initial=g.input_bytes)) <= budget:
        s = to_schedule(g, base, method="exact", budget=budget)
        s.info.update(optimal=True, solve_time_s=time.perf_counter() - t0)
        return s
    seq = exact_sequence(g, budget, time_limit=time_limit, max_states=max_states, max_nodes=max_nodes)
    if seq is None:
        left = max(0.1, time_limit - (time.perf_counter() - t0))
        mp, _ = exact_min_peak(g, time_limit=left, max_states=max_states, max_nodes=max_nodes)
        raise InfeasibleBudget(budget=budget, min_peak=mp, method="exact")
    s = to_schedule(g, seq, method="exact", budget=budget)
    s.info.update(optimal=True, solve_time_s=time.perf_counter() - t0)
    return s
