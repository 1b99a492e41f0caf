"""The compiled path keeps each joint graph's frontier: a later partition of the same joint graph (the refining
compile) takes it instead of running torch's knapsack and memfit's greedy passes again, and chooses as a backend
that computes the frontier afresh would."""

import dataclasses

import torch

import memfit.remat

from .test_compiled import CASES, RATES


def _compile_once(backend, name="mini-gpt"):
    make_model, loss_fn, make_batch = CASES[name]
    torch.manual_seed(0)
    model, batch = make_model(), make_batch()
    torch._dynamo.reset()
    torch.compile(lambda b: loss_fn(model, b), backend=backend)(batch).backward()


def test_a_second_partition_of_the_same_graph_reuses_its_frontier(monkeypatch):
    from memfit.remat.compiled import choose

    computed = []
    real = choose._frontier

    def spy(model, start, extra=()):
        out = real(model, start, extra)
        computed.append([(peak, cost, frozenset(n.name for n in r)) for peak, cost, r in out])
        return out

    monkeypatch.setattr(choose, "_frontier", spy)
    memo = memfit.remat.backend(budget=0.8, compiler="aot_eager", rates=RATES)
    _compile_once(memo)
    assert len(computed) == 1 and list(memo._frontiers.values()) == computed
    memo.budget = 0.6  # the same joint graph under another aim, as in a refining compile
    _compile_once(memo)
    assert len(computed) == 1  # taken from the memo: no frontier computed
    fresh = memfit.remat.backend(budget=0.6, compiler="aot_eager", rates=RATES)
    _compile_once(fresh)
    assert len(computed) == 2 and computed[1] == computed[0]  # deterministic, and free of the budget
    with_memo, afresh = (dataclasses.replace(p, solve_seconds=0.0) for p in (memo.plans[1], fresh.plans[0]))
    assert with_memo == afresh
    assert memo.plans[1].recomputed_ops > memo.plans[0].recomputed_ops  # the lower budget changed the choice
