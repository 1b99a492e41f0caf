"""Graph families shaped like training steps, shared by the tests and the benchmarks.

Each builds a forward pass, a loss, and a mirrored backward pass that reads forward values (as
autograd does), so the no-remat peak holds every activation at the turn from forward to backward.

- :func:`chain`: a chain of ``n`` layers with its backward (treewidth 2).
- :func:`residual_ladder`: ``n`` residual blocks ``x + B(A(x))`` with their backward (small treewidth).
- :func:`training_step`: a random forward DAG with skip connections, a loss and its backward.
"""

from __future__ import annotations

import numpy as np

from memfit.remat.core.graph import Graph

__all__ = ["chain", "residual_ladder", "training_step"]


def chain(
    n: int,
    *,
    act_bytes: int | list[int] = 1 << 20,
    cost: float = 1.0,
    params: bool = True,
    param_bytes: int = 1 << 12,
) -> Graph:
    """A chain ``f_i = F_i(f_{i-1})`` of ``n`` layers, a loss, and the backward pass.

    Backward: ``d_n = dL/df_n`` reads the loss and ``f_n``; ``d_{i-1}`` reads ``d_i`` and ``f_{i-1}``
    (the layer's input); with ``params`` each layer has a weight input and a gradient output
    ``gw_i`` reading ``d_i`` and ``f_{i-1}``; without, the output is the input gradient ``d_0``.

    Args:
        n: number of layers (>= 1).
        act_bytes: bytes of each activation (one int, or a list of ``n + 1`` for ``f_0..f_n``).
        cost: forward cost of a layer; a backward node costs twice that.
        params: give each layer a weight (input) and a weight gradient (output).
        param_bytes: bytes of each weight and weight gradient.
    """
    if n < 1:
        raise ValueError(f"chain needs n >= 1 layers, got {n}")
    acts = [act_bytes] * (n + 1) if isinstance(act_bytes, int) else list(act_bytes)
    if len(acts) != n + 1:
        raise ValueError(f"act_bytes needs n + 1 = {n + 1} entries, got {len(acts)}")
    g = Graph()
    f = [g.add("f0", acts[0], input=True)]
    w = [g.add(f"w{i}", param_bytes, input=True) for i in range(1, n + 1)] if params else []
    for i in range(1, n + 1):
        deps = [f[i - 1]] + ([w[i - 1]] if params else [])
        f.append(g.add(f"f{i}", acts[i], cost, deps))
    loss = g.add("loss", 4, cost, [f[n]], output=True)
    d = g.add(f"d{n}", acts[n], cost, [loss, f[n]])
    for i in range(n, 0, -1):
        if params:
            g.add(f"gw{i}", param_bytes, 2 * cost, [d, f[i - 1]], output=True)
        if i > 1 or not params:
            d = g.add(
                f"d{i - 1}",
                acts[i - 1],
                2 * cost,
                [d, f[i - 1]] + ([w[i - 1]] if params else []),
                output=(i == 1),
            )
    return g


def residual_ladder(
    n: int,
    *,
    act_bytes: int = 1 << 20,
    cost: float = 1.0,
    params: bool = True,
    param_bytes: int = 1 << 12,
) -> Graph:
    """``n`` residual blocks ``x_{k+1} = x_k + B(A(x_k))``, a loss, and the backward pass.

    Backward of block k: ``dh_k`` reads ``g_{k+1}`` and ``h_k`` (B's input), ``dx_k`` reads ``dh_k``
    and ``x_k`` (A's input), ``g_k = g_{k+1} + dx_k``; weight gradients read the same values.
    """
    if n < 1:
        raise ValueError(f"residual_ladder needs n >= 1 blocks, got {n}")
    g = Graph()
    x = [g.add("x0", act_bytes, input=True)]
    h: list[int] = []
    wa: list[int] = []
    wb: list[int] = []
    for k in range(n):
        if params:
            wa.append(g.add(f"wa{k}", param_bytes, input=True))
            wb.append(g.add(f"wb{k}", param_bytes, input=True))
        h.append(g.add(f"h{k}", act_bytes, cost, [x[k]] + ([wa[k]] if params else [])))
        y = g.add(f"y{k}", act_bytes, cost, [h[k]] + ([wb[k]] if params else []))
        x.append(g.add(f"x{k + 1}", act_bytes, 0.25 * cost, [x[k], y]))
    loss = g.add("loss", 4, cost, [x[n]], output=True)
    gk = g.add(f"g{n}", act_bytes, cost, [loss, x[n]])
    for k in range(n - 1, -1, -1):
        if params:
            g.add(f"gwb{k}", param_bytes, 2 * cost, [gk, h[k]], output=True)
        dh = g.add(f"dh{k}", act_bytes, 2 * cost, [gk, h[k]] + ([wb[k]] if params else []))
        if params:
            g.add(f"gwa{k}", param_bytes, 2 * cost, [dh, x[k]], output=True)
        dx = g.add(f"dx{k}", act_bytes, 2 * cost, [dh, x[k]] + ([wa[k]] if params else []))
        gk = g.add(f"g{k}", act_bytes, 0.25 * cost, [gk, dx], output=(k == 0 and not params))
    return g


def training_step(
    n: int,
    *,
    seed: int = 0,
    skip_prob: float = 0.3,
    param_prob: float = 0.5,
    max_bytes: int = 8,
    unit: int = 1,
    nonrecomputable_prob: float = 0.0,
    weight_bytes: int | None = None,
    skip_window: int = 8,
) -> Graph:
    """A random training step: a forward DAG of ``n`` nodes with skips, a loss, and its backward.

    Forward node ``i`` reads ``f_{i-1}`` and, with probability ``skip_prob`` each, up to two of the
    ``skip_window`` nodes before it; with probability ``param_prob`` it has a weight (input). The gradient ``g_i`` reads the
    gradients of ``f_i``'s users and one or two forward values (``f_i`` or its deps), as a vjp does.
    Weight gradients (outputs) read ``g_i`` and a forward dep of ``f_i``.

    Args:
        n: forward nodes (>= 1).
        seed: numpy seed; the same arguments give the same graph.
        skip_prob: probability of each extra skip edge.
        param_prob: probability that a forward node has a weight; node 1 always has one.
        max_bytes: value sizes are drawn from ``1..max_bytes`` times ``unit``.
        unit: bytes per size step.
        nonrecomputable_prob: probability that a forward node is not recomputable (dropout-like).
        skip_window: skips reach back at most this many nodes (residual/U-Net-like locality;
            unbounded skips make every forward value live across the whole pass).
        weight_bytes: bytes of every weight (and weight gradient); default: drawn like the values.
            Real networks' activations dwarf their weights; pass a small value to model that.
    """
    if n < 1:
        raise ValueError(f"training_step needs n >= 1 forward nodes, got {n}")
    rng = np.random.default_rng(seed)
    g = Graph()

    def size() -> int:
        return int(rng.integers(1, max_bytes + 1)) * unit

    def cost() -> float:
        return float(rng.integers(1, 7)) / 2.0

    x = g.add("x", size(), input=True)
    fwd = [x]
    fdeps: dict[int, list[int]] = {}
    has_w: dict[int, int] = {}
    users: dict[int, list[int]] = {x: []}
    for i in range(1, n + 1):
        deps = [fwd[i - 1]]
        earlier = fwd[max(0, i - 1 - skip_window) : i - 1]
        extra = [j for j in earlier if rng.random() < skip_prob]
        rng.shuffle(extra)
        deps += extra[:2]
        if i == 1 or rng.random() < param_prob:
            has_w[i] = g.add(f"w{i}", size() if weight_bytes is None else weight_bytes, input=True)
        recomp = not (rng.random() < nonrecomputable_prob)
        v = g.add(f"f{i}", size(), cost(), deps + ([has_w[i]] if i in has_w else []), recomputable=recomp)
        fdeps[v] = deps
        users[v] = []
        for d in deps:
            users[d].append(v)
        fwd.append(v)
    loss = g.add("loss", unit, cost(), [fwd[n]], output=True)
    grad: dict[int, int] = {}
    for i in range(n, 0, -1):
        v = fwd[i]
        reads = [grad[u] for u in users[v]] if users[v] else [loss]
        saved = [v] + [d for d in fdeps[v] if d != x]
        pick = (
            [saved[0]] if rng.random() < 0.5 or len(saved) == 1 else [saved[int(rng.integers(1, len(saved)))]]
        )
        if len(saved) > 1 and rng.random() < 0.3:
            pick.append(saved[int(rng.integers(0, len(saved)))])
        grad[v] = g.add(f"g{i}", size(), 2 * cost(), reads + pick)
        if i in has_w:
            g.add(f"gw{i}", g.nbytes(has_w[i]), cost(), [grad[v], fdeps[v][0]], output=True)
    return g
