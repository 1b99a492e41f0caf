"""The optimal checkpointing dynamic program for chains (revolve / rotor family).

A *chain* here is a graph whose forward part (the ancestors of the loss) is a path
``p_1 -> p_2 -> ... -> p_L`` (each ``p_i`` reads ``p_{i-1}`` and inputs only), and whose other
needed nodes -- the backward -- read forward values stage by stage: in id order, each backward
node reads at most one path value ``p_j`` (plus ``p_L`` when it is an output, which then stays
resident), with ``j`` never increasing; the nodes reading ``p_j`` form *group* ``G_j``. This is
what :func:`memfit.remat.graphs.chain` builds, with any bytes and costs per layer.

Recurrence (Griewank & Walther, "Algorithm 799: revolve", ACM TOMS 2000, for the homogeneous
case; Beaumont, Herrmann, Pallez, Shilova, "Optimal checkpointing for heterogeneous chains: how
to train deep neural networks with limited memory", 2019 -- the rotor DP -- for per-layer bytes
and costs). With ``p_s`` resident (a checkpoint), to run groups ``G_{t-1} .. G_s`` either

- *store all*: compute ``p_{s+1} .. p_{t-1}``, keep them, run the groups top-down (each ``p_j`` is
  freed after its last read in ``G_j``); or
- *split* at ``s < k < t``: advance ``p_s -> p_k`` (freeing intermediates), keep ``p_k``, solve
  ``[k, t]`` holding its bytes, which frees it, then solve ``[s, k]``.

``C(s, t, u)`` is the least forward recompute cost with ``u`` memory units held by checkpoints
(``p_s`` included); the answer is ``C(0, L + 1, 0)``. Memory is discretised in units of ``q =
(budget - base) / units`` bytes and held bytes are rounded *up*, so every state the DP accepts
fits; the emitted compute sequence goes through the simulator anyway and the DP is re-run with a
smaller budget if the exact peak is over (non-recomputable nodes can cause that). Split points
may be restricted to every ``stride``-th layer (``max_points``) to bound the O(P^3 U) work on
long chains; store-all segments still cover every layer. The backward costs are the same in every
schedule and are not part of the DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from memfit.remat.core.graph import Graph
from memfit.remat.core.solvers._common import compute_once
from memfit.remat.core.solvers._improve import drop_useless, seq_peak

__all__ = ["ChainView", "as_chain", "chain_dp_sequence"]

_INF = float("inf")


@dataclass(frozen=True)
class ChainView:
    """A graph read as a chain: path nodes, per-layer numbers, backward groups (index 1..L)."""

    path: list[int]  # p_1..p_L node ids
    a: np.ndarray  # int64[L+1]: bytes of p_i held as an activation (a[0] = 0; a[L] = 0 if output)
    f: np.ndarray  # float64[L+1]: forward cost of p_i (f[0] = 0)
    groups: list[list[int]]  # groups[j]: backward node ids reading p_j, id order (groups[0] empty)
    fixed: np.ndarray  # int64[L+1]: backward bytes resident just before G_j starts
    gpeak: np.ndarray  # int64[L+1]: backward bytes at the worst compute of G_j reading p_j (or before)
    gafter: np.ndarray  # int64[L+1]: the same after G_j's last read of p_j (p_j already freed)
    base: int  # always counted: inputs (+ p_L when it is an output)


def as_chain(g: Graph) -> ChainView | None:
    """Read ``g`` as a chain (see the module docstring), or ``None`` if it is not one."""
    if "chain_view" in g._cache:
        cached: ChainView | None = g._cache["chain_view"]
        return cached
    view = _as_chain(g)
    g._cache["chain_view"] = view
    return view


def _as_chain(g: Graph) -> ChainView | None:
    # the loss: the first output that other needed nodes read; the forward part: its ancestors
    needed = g.needed()
    nset = set(needed)
    outs = [v for v in g.outputs if not g.is_input(v)]
    if not outs or not any(u in nset for u in g.users(min(outs))):
        return None
    loss = min(outs)
    seen = {loss}
    stack = [loss]
    while stack:
        for d in g.deps(stack.pop()):
            if d not in seen and not g.is_input(d):
                seen.add(d)
                stack.append(d)
    fwd = sorted(seen)
    pos = {v: i + 1 for i, v in enumerate(fwd)}
    for i, v in enumerate(fwd):
        for d in g.deps(v):
            if g.is_input(d):
                continue
            if i == 0 or d != fwd[i - 1]:
                return None
    big_l = len(fwd)
    last_out = g.is_output(fwd[-1])
    if any(g.is_output(v) for v in fwd[:-1]):
        return None
    groups: list[list[int]] = [[] for _ in range(big_l + 1)]
    stage = big_l
    back = [v for v in needed if v not in pos]
    for v in back:
        reads = {pos[d] for d in g.deps(v) if d in pos}
        if last_out:
            reads.discard(big_l)
        if len(reads) > 1:
            return None
        if reads:
            (j,) = reads
            if j > stage:
                return None
            stage = j
        groups[stage].append(v)
    # backward memory alone, frees at the last read (outputs stay): fixed / gpeak per group
    last_read: dict[int, int] = {}
    order = {v: t for t, v in enumerate(back)}
    for v in back:
        for d in g.deps(v):
            if d in order:
                last_read[d] = order[v]
    expire: dict[int, list[int]] = {}
    for v in back:
        if not g.is_output(v):
            expire.setdefault(last_read.get(v, order[v]), []).append(v)
    fixed = np.zeros(big_l + 1, dtype=np.int64)
    gpeak = np.zeros(big_l + 1, dtype=np.int64)
    gafter = np.zeros(big_l + 1, dtype=np.int64)
    mem = 0
    for j in range(big_l, 0, -1):
        fixed[j] = mem
        # p_j is freed after its last reader in G_j: split the group's peak there
        last = max((t for t, v in enumerate(groups[j]) if fwd[j - 1] in g.deps(v)), default=-1)
        peak = after = mem
        for t, v in enumerate(groups[j]):
            mem += g.nbytes(v)
            if t <= last:
                peak = max(peak, mem)
            else:
                after = max(after, mem)
            for u in expire.get(order[v], ()):
                mem -= g.nbytes(u)
        gpeak[j] = peak
        gafter[j] = after
    a = np.zeros(big_l + 1, dtype=np.int64)
    f = np.zeros(big_l + 1, dtype=np.float64)
    for i, v in enumerate(fwd, start=1):
        a[i] = g.nbytes(v)
        f[i] = g.cost(v)
    base = g.input_bytes
    if last_out:
        base += int(a[big_l])
        a[big_l] = 0
    return ChainView(fwd, a, f, groups, fixed, gpeak, gafter, base)


def _solve_tables(
    ch: ChainView, mem: int, points: list[int], units: int
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Fill the cost table and choices over split points; ``None`` when ``mem`` is below the base."""
    free = mem - ch.base
    if free < 0:
        return None
    q = max(1, math.ceil(free / units)) if free > 0 else 1
    n_u = free // q + 1  # u = 0 .. n_u - 1 held units allowed
    npts = len(points)
    big_l = len(ch.a) - 1
    a = np.concatenate([ch.a, [0]])  # position L + 1 is virtual (past the last layer)
    acum = np.concatenate([[0], np.cumsum(a[1:])]).astype(np.int64)  # acum[i] = a_1 + .. + a_i
    fcum = np.concatenate([[0.0], np.cumsum(ch.f[1:]), [float(ch.f[1:].sum())]])
    gpk = np.concatenate([ch.gpeak, [0]])
    gaf = np.concatenate([ch.gafter, [0]])
    fixed = np.concatenate([ch.fixed, [0]])
    # sa[i, j]: store-all peak of [s, t] beyond held + base; adv[i, k]: advance peak s -> k
    sa = np.zeros((npts, npts), dtype=np.int64)
    adv = np.zeros((npts, npts), dtype=np.int64)
    for i, s in enumerate(points[:-1]):
        ls = np.arange(s, big_l + 1)  # groups G_s .. G_L
        upto = acum[ls] - acum[s]  # p_{s+1} .. p_l resident while G_l runs
        back = np.maximum.accumulate(np.maximum(upto + gpk[ls], upto - a[ls] + gaf[ls]))
        pair = a[ls] + np.where(ls - 1 > s, a[np.maximum(ls - 1, 0)], 0)
        pair[0] = 0
        advm = np.maximum.accumulate(pair)
        for j in range(i + 1, npts):
            t = points[j]
            top = t - 1 - s  # index of l = t - 1 in ls
            sa[i, j] = max(int(fixed[t - 1] + upto[top]), int(back[top]))
            adv[i, j] = int(advm[top + 1]) if top + 1 < len(advm) else 0
    w = np.array([math.ceil(int(a[p]) / q) for p in points], dtype=np.int64)
    pts = np.array(points)
    uu = np.arange(n_u, dtype=np.int64)
    held = uu * q
    cost = np.full((npts, npts, n_u + 1), _INF)  # last column: u out of range -> inf
    pick = np.full((npts, npts, n_u), -2, dtype=np.int64)
    for length in range(1, npts):
        for i in range(npts - length):
            j = i + length
            s, t = points[i], points[j]
            ok = held + sa[i, j] <= free
            best = np.where(ok, fcum[t - 1] - fcum[s], _INF)
            choice = np.where(ok, -1, -2)
            if length > 1:
                ks = np.arange(i + 1, j)
                up = np.minimum(uu[None, :] + w[ks][:, None], n_u)  # n_u -> the inf column
                fk = (fcum[pts[ks]] - fcum[s])[:, None]
                vals = fk + cost[ks[:, None], j, up] + cost[i, ks, :n_u]
                adv_ok = held[None, :] + fixed[t - 1] + adv[i, ks][:, None] <= free
                vals = np.where(adv_ok, vals, _INF)
                kbest = np.argmin(vals, axis=0)
                vbest = vals[kbest, uu]
                better = vbest < best - 1e-12
                best = np.where(better, vbest, best)
                choice = np.where(better, ks[kbest], choice)
            cost[i, j, :n_u] = best
            pick[i, j] = choice
    return cost, pick, q


def _emit(ch: ChainView, points: list[int], pick: np.ndarray, q: int) -> list[int]:
    path = ch.path
    w = [math.ceil(int(ch.a[p]) / q) if p < len(ch.a) else 0 for p in points]
    seq: list[int] = []
    # explicit stack of (i, j, u) in the order the recursion visits them
    stack: list[tuple[int, int, int]] = [(0, len(points) - 1, 0)]
    while stack:
        i, j, u = stack.pop()
        s, t = points[i], points[j]
        k = int(pick[i, j, u])
        if k == -1:
            seq.extend(path[s : t - 1])  # p_{s+1} .. p_{t-1}
            for layer in range(t - 1, s - 1, -1):
                seq.extend(ch.groups[layer])
            continue
        assert k >= 0, "DP emitted an infeasible state"
        seq.extend(path[s : points[k]])  # advance p_{s+1} .. p_k
        stack.append((i, k, u))  # runs second, after p_k is freed
        stack.append((k, j, u + w[k]))  # runs first, with p_k held
    return seq


def chain_dp_sequence(
    g: Graph, budget: int, *, units: int = 48, max_points: int = 128, retries: int = 4
) -> list[int] | None:
    """Least-recompute chain schedule within ``budget`` bytes, as a compute sequence.

    Args:
        g: the graph (must read as a chain, see :func:`as_chain`).
        budget: bytes of total peak.
        units: memory discretisation (held bytes are rounded up to ``budget / units``).
        max_points: at most this many split points (every ``ceil(L / max_points)``-th layer).
        retries: re-runs with a smaller DP budget when the simulated peak is over ``budget``.

    Returns:
        The compute sequence (simulated peak <= ``budget``), or ``None`` if the DP finds none or
        the graph is not a chain.
    """
    ch = as_chain(g)
    if ch is None:
        return None
    big_l = len(ch.path)
    stride = max(1, math.ceil(big_l / max_points))
    points = sorted(set(range(0, big_l + 1, stride)) | {big_l, big_l + 1})
    mem = budget
    for _ in range(retries + 1):
        tables = _solve_tables(ch, mem, points, units)
        if tables is None:
            return None
        cost, pick, q = tables
        if not math.isfinite(cost[0, len(points) - 1, 0]):
            return None
        seq = drop_useless(g, compute_once(g, _emit(ch, points, pick, q)))
        peak = seq_peak(g, seq)
        if peak <= budget:
            return seq
        mem -= peak - budget  # the model was optimistic (non-recomputable nodes): shrink and retry
    return None
