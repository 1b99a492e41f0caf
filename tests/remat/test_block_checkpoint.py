"""Never above per-block checkpointing: with the blocks' inputs as a keep-set, budget's least peak is at most
that of checkpointing each block, and it finds a schedule at that peak."""

from memfit.remat.core import Graph, graphs, solve
from memfit.remat.core.solvers._improve import seq_peak
from memfit.remat.core.solvers.budget import min_peak_budget
from memfit.remat.core.solvers.checkpoint import keep_sequence


def _masked_ladder(n: int, act: int = 1 << 10) -> tuple[Graph, list[int]]:
    """A residual ladder whose every block also reads one mask computed from the batch (as BERT's extended
    attention mask or Llama's rotary tables): the mask joins every block, so the block inputs are no longer
    articulation points and the structured checkpoint candidates miss them. Returns the graph and the blocks'
    inputs."""
    g = Graph()
    x = [g.add("x0", act, input=True)]
    mask = g.add("mask", act // 8, 0.1, [x[0]])
    hs, blocks = [], []
    for k in range(n):
        w = g.add(f"w{k}", 64, input=True)
        blocks.append(x[k])
        h = g.add(f"h{k}", 4 * act, 1.0, [x[k], w, mask])
        y = g.add(f"y{k}", act, 1.0, [h, w])
        hs.append(h)
        x.append(g.add(f"x{k + 1}", act, 0.25, [x[k], y]))
    loss = g.add("loss", 4, 1.0, [x[n]], output=True)
    gk = g.add(f"g{n}", act, 1.0, [loss, x[n]])
    for k in range(n - 1, -1, -1):
        dh = g.add(f"dh{k}", 4 * act, 2.0, [gk, hs[k]])
        g.add(f"gw{k}", 64, 2.0, [dh, x[k], mask], output=True)
        dx = g.add(f"dx{k}", act, 2.0, [dh, x[k], mask])
        gk = g.add(f"g{k}", act, 0.25, [gk, dx])
    return g, [b for b in blocks if not g.is_input(b)]


def test_budget_is_never_above_per_block_checkpointing():
    for g, blocks in [
        _masked_ladder(5),
        (graphs.residual_ladder(4), [graphs.residual_ladder(4).id(f"x{k}") for k in range(1, 4)]),
    ]:
        per_block = seq_peak(g, keep_sequence(g, blocks))
        assert per_block < solve(g, method="noremat").peak  # it saves memory at all
        keep = {"blocks": blocks}
        assert min_peak_budget(g, keep_sets=keep) <= per_block
        s = solve(g, per_block, keep_sets=keep)
        assert s.peak <= per_block
        assert solve(g, "min", keep_sets=keep).peak <= per_block


def test_min_peak_budget_offers_the_keep_sets_to_its_search(monkeypatch):
    """``min_peak_budget(keep_sets=...)`` hands the keep-sets to the search (it once dropped them, so the
    least peak it reported could lie above per-block checkpointing on a graph the heuristics miss)."""
    from memfit.remat.core.solvers import budget

    g, blocks = _masked_ladder(8)  # 68 nodes: above the exact search's size, so the heuristics answer
    seen = []
    real = budget._keep_candidates

    def spy(graph, keep_sets):
        seen.append(keep_sets)
        return real(graph, keep_sets)

    monkeypatch.setattr(budget, "_keep_candidates", spy)
    keep = {"blocks": blocks}
    assert min_peak_budget(g, keep_sets=keep) <= seq_peak(g, keep_sequence(g, blocks))
    assert any(k == keep for k in seen), seen
