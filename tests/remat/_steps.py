"""A hypothesis strategy for random training-step graphs, built from hypothesis draws (so that failures shrink).

Forward chain ``f_1..f_n`` with skips (each node may also read up to two of the three nodes before its
predecessor), some weights (inputs) and some non-recomputable nodes (dropout-like), a loss (output), a mirrored
backward (``g_i`` reads the gradients of ``f_i``'s users, or the loss, and one or two saved forward values: ``f_i``
or one of its deps, as a vjp does), and a weight gradient (output) per weight.
"""

from hypothesis import assume
from hypothesis import strategies as st

from memfit.remat.core import Graph


@st.composite
def training_steps(draw, min_nodes: int = 12, max_nodes: int = 30, max_forward: int = 12):
    n = draw(st.integers(3, max_forward))
    size = st.integers(1, 8)
    cost = st.integers(1, 6).map(lambda k: k / 2)
    g = Graph()
    x = g.add("x", draw(size), input=True)
    fwd = [x]
    fdeps: dict[int, list[int]] = {}
    weights: dict[int, int] = {}
    users: dict[int, list[int]] = {x: []}
    for i in range(1, n + 1):
        deps = [fwd[i - 1]]
        for j in range(max(0, i - 4), i - 1):
            if len(deps) < 3 and draw(st.booleans()) and draw(st.booleans()):
                deps.append(fwd[j])
        if i == 1 or draw(st.booleans()):
            weights[i] = g.add(f"w{i}", draw(size), input=True)
        recomputable = draw(st.integers(0, 4)) != 0  # one in five is dropout-like
        v = g.add(
            f"f{i}",
            draw(size),
            draw(cost),
            deps + ([weights[i]] if i in weights else []),
            recomputable=recomputable,
        )
        fdeps[v] = deps
        users[v] = []
        for d in deps:
            users[d].append(v)
        fwd.append(v)
    loss = g.add("loss", 1, draw(cost), [fwd[n]], output=True)
    grad: dict[int, int] = {}
    for i in range(n, 0, -1):
        v = fwd[i]
        reads = [grad[u] for u in users[v]] if users[v] else [loss]
        saved = [v] + [d for d in fdeps[v] if d != x]
        pick = [draw(st.sampled_from(saved))]
        if len(saved) > 1 and draw(st.booleans()):
            pick.append(draw(st.sampled_from(saved)))
        grad[v] = g.add(f"g{i}", draw(size), 2 * draw(cost), reads + pick)
        if i in weights:
            g.add(f"gw{i}", g.nbytes(weights[i]), draw(cost), [grad[v], fdeps[v][0]], output=True)
    assume(min_nodes <= len(g.needed()) <= max_nodes)
    return g
