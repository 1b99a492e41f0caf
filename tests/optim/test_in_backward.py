"""memfit.optim.step_in_backward: the same parameters as the ordinary loop, gradients never all resident."""

import copy

import pytest
import torch
from torch import nn

import memfit.remat
from memfit.memory import track
from memfit.optim import SM3, step_in_backward
from memfit.remat.eager.updates import sink_gradients

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    "sm3": lambda ps: SM3(ps, lr=0.1, fused=False),
    "sm3-fused": lambda ps: SM3(ps, lr=0.1, fused=True),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5)
    )


def _batch(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _xent(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _train(model, opt, steps, *, remat=None, in_backward=False, clip=None, clip_mode="two_pass"):
    """``steps`` steps with a StepLR schedule and a state_dict round trip half-way; returns the handle."""
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    handle = step_in_backward(opt, clip_grad_norm=clip, clip_mode=clip_mode) if in_backward else None
    for i in range(steps):
        batch = _batch(i)
        run = (
            (lambda b=batch: remat(b)) if remat is not None else (lambda b=batch: _xent(model, b).backward())
        )
        if handle is not None and clip is not None:
            handle.run(run)
        else:
            run()
        if handle is not None:
            assert all(p.grad is None for p in model.parameters())  # consumed in the backward
        elif clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()  # a no-op for the parameters updated in the backward
        sched.step()
        opt.zero_grad()
        if i == 1:
            opt.load_state_dict(
                copy.deepcopy(opt.state_dict())
            )  # new group dicts: the hooks must follow them
    return handle


def _same(m1, m2, exact):
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        if exact:
            assert torch.equal(a, b), n
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def _runs(remat, **kw):
    """Parameters after the ordinary loop and after step_in_backward, from the same start, on one model (and one
    remat capture: the step is scheduled once without and once with the gradients consumed)."""
    model = _model()
    initial = copy.deepcopy(model.state_dict())
    step = memfit.remat.compile(model, _xent, _batch(0), budget=0.8) if remat else None

    def run(in_backward, make):
        model.load_state_dict(initial)
        opt = make(model.parameters())
        handle = _train(model, opt, 4, remat=step, in_backward=in_backward, **kw)
        if handle is not None:
            assert handle.updates == 4 * len(list(model.parameters()))
            handle.remove()
        return copy.deepcopy(dict(model.named_parameters())), opt.state_dict()

    return run, step, model


@pytest.mark.parametrize("remat", [False, True], ids=["autograd", "remat"])
def test_parameters_equal_the_ordinary_loop_bitwise(remat):
    run, step, _ = _runs(remat)
    for name, make in OPTIMIZERS.items():
        (p1, st1), (p2, st2) = run(False, make), run(True, make)
        for n in p1:  # each parameter's update runs the same ops in the same order: bitwise equal
            assert torch.equal(p1[n], p2[n]), (name, n)
        assert st1["param_groups"] == st2["param_groups"], name  # the scheduler's lr included
        for k, s in st1["state"].items():
            for key, v in s.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(st2["state"][k][key])), (name, k, key)
    if step is not None:  # the solver planned the gradients as transient
        step_in_backward(torch.optim.SGD(_model().parameters(), lr=0.1)).remove()
        cap = step.captured
        graph = sink_gradients(cap, cap.param_names).graph
        assert not any(graph.is_output(cap.output_ids[i]) for i in cap.grad_outputs.values())


@pytest.mark.parametrize("remat", [False, True], ids=["autograd", "remat"])
def test_two_pass_clipping_equals_clip_grad_norm(remat):
    run, _, model = _runs(remat, clip=0.05)
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    (p1, _), (p2, _) = run(False, adam), run(True, adam)
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-5, atol=1e-6, msg=n)
    # the clip was active: an unclipped run ends elsewhere
    m3 = _model()
    _train(m3, torch.optim.Adam(m3.parameters(), lr=1e-2), 4)
    assert not torch.allclose(m3[0].weight, p2["0.weight"], atol=1e-4)
    # the norm it measures is clip_grad_norm_'s
    m4 = copy.deepcopy(model)
    _xent(model, _batch(2)).backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    h4 = step_in_backward(torch.optim.SGD(m4.parameters(), lr=0.0), clip_grad_norm=0.05)
    h4.backward(_xent(m4, _batch(2)))
    assert h4.last_norm is not None
    torch.testing.assert_close(h4.last_norm, expected)


def test_two_pass_backward_of_a_loss_equals_clip_grad_norm():
    base = _model()
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    handle = step_in_backward(o2, clip_grad_norm=0.1)
    for i in range(3):
        _xent(m1, _batch(i)).backward()
        torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.1)
        o1.step()
        o1.zero_grad()
        handle.backward(_xent(m2, _batch(i)))  # the graph is kept for the second pass, then freed
    _same(m1, m2, exact=False)


def test_previous_norm_clipping_uses_the_last_steps_coefficient():
    """Reference: the ordinary loop, each step's gradients scaled by min(1, max / (previous total norm + 1e-6))."""
    base = _model()
    m2 = copy.deepcopy(base)
    _train(m2, torch.optim.SGD(m2.parameters(), lr=0.1), 3, in_backward=True, clip=0.1, clip_mode="previous")
    # _train runs a StepLR schedule; replay the reference with it
    m1 = copy.deepcopy(base)
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.7)
    coef = None
    for i in range(3):
        _xent(m1, _batch(i)).backward()
        grads = [p.grad for p in m1.parameters()]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)
        if coef is not None:
            for g in grads:
                g.mul_(coef)
        coef = torch.clamp(0.1 / (total + 1e-6), max=1.0)
        o1.step()
        sched.step()
        o1.zero_grad()
    assert coef < 1.0  # the clip was active
    _same(m1, m2, exact=False)


def test_step_and_zero_grad_are_no_ops_and_remove_restores_the_ordinary_loop():
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    handle = step_in_backward(opt)
    _xent(m, _batch(0)).backward()
    after = copy.deepcopy(m.state_dict())
    state = copy.deepcopy(opt.state_dict())
    opt.step()  # no second step
    opt.zero_grad()
    for k, v in m.state_dict().items():
        assert torch.equal(v, after[k]), k
    assert all(int(s["step"]) == 1 for s in opt.state_dict()["state"].values())
    assert opt.state_dict()["state"].keys() == state["state"].keys()
    with pytest.raises(RuntimeError, match="already active"):
        step_in_backward(opt)
    handle.remove()
    assert not handle.active
    _xent(m, _batch(1)).backward()
    assert all(p.grad is not None for p in m.parameters())  # back to the ordinary loop
    for k, v in m.state_dict().items():
        assert torch.equal(v, after[k]), k
    step_in_backward(opt).remove()  # a new handle may be made after remove()


def test_clipping_needs_the_handle_to_run_the_backward():
    m = _model()
    handle = step_in_backward(torch.optim.SGD(m.parameters(), lr=0.1), clip_grad_norm=1.0)
    with pytest.raises(RuntimeError, match=r"handle\.backward"):
        _xent(m, _batch(0)).backward()
    handle.remove()


def test_invalid_arguments_and_distributed_setups_are_refused(monkeypatch):
    m = _model()
    with pytest.raises(TypeError, match="LBFGS"):
        step_in_backward(torch.optim.LBFGS(m.parameters()))
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        step_in_backward(m)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="clip_grad_norm"):
            step_in_backward(torch.optim.SGD(m.parameters(), lr=0.1), clip_grad_norm=bad)
    with pytest.raises(ValueError, match="clip_mode"):
        step_in_backward(torch.optim.SGD(m.parameters(), lr=0.1), clip_grad_norm=1.0, clip_mode="x")  # type: ignore[arg-type]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="DDP"):
        step_in_backward(torch.optim.SGD(m.parameters(), lr=0.1))


def _wide() -> nn.Module:
    """Parameters large against the activations of a small batch: the gradients are part of the peak."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(192, 192), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(192, 5))


@pytest.mark.parametrize("remat", [False, True], ids=["autograd", "remat"])
def test_step_peak_falls_by_the_gradients(remat):
    batch = (torch.randn(4, 192), torch.randint(0, 5, (4,)))
    grad_bytes = sum(p.numel() * p.element_size() for p in _wide().parameters())
    peaks = {}
    for in_backward in (False, True):
        m = _wide()
        opt = torch.optim.SGD(
            m.parameters(), lr=0.1
        )  # no state: the step's peak is the gradients' and temporaries'
        step = memfit.remat.compile(m, _xent, batch, budget=1.0) if remat else None
        handle = step_in_backward(opt) if in_backward else None
        if step is not None:
            step.prepare(batch)
        with track() as t:
            if step is not None:
                step(batch)
            else:
                _xent(m, batch).backward()
            opt.step()
            opt.zero_grad()
        peaks[in_backward] = t.report.peak_bytes
        if handle is not None:
            handle.remove()
        if step is not None and in_backward:
            plan = step.plan  # the prediction with transient gradients matches the measurement
            assert t.report.peak_bytes == pytest.approx(plan.peak_bytes, rel=0.10)
    assert peaks[False] - peaks[True] >= 0.6 * grad_bytes, (peaks, grad_bytes)


def test_updates_follow_the_gradient_and_the_last_reader_of_the_parameter():
    """For every budget: each update comes after the last op that reads its parameter and right after the later
    of that and its gradient's compute; the gradient is freed with it."""
    m = _model()
    step = memfit.remat.compile(m, _xent, _batch(0), budget=1.0)
    step_in_backward(torch.optim.SGD(m.parameters(), lr=0.0))
    for budget in (1.0, 0.8, 0.6):
        s = step.with_budget(budget)
        s.prepare(_batch(0))
        sched, cap = s.schedule, s.captured
        g = sched.graph
        names = dict(zip(cap.param_names, cap.placeholder_ids, strict=False))
        updates = {
            v: g.name(v)[len("update[") : -1] for v in range(len(g)) if g.name(v).startswith("update[")
        }
        assert len(updates) == len(cap.grad_outputs)
        events = sched.events
        for i, (kind, v) in enumerate(events):
            if kind != "compute" or v not in updates:
                continue
            param = names[updates[v]]
            assert not any(k == "compute" and param in g.deps(w) for k, w in events[i + 1 :]), updates[v]
            prev = [w for k, w in events[:i] if k == "compute" and w not in updates][-1]
            assert prev in g.deps(v) or param in g.deps(prev), (updates[v], g.name(prev))
        # the same graph as the capture's, but no gradient is an output any more
        graph = sink_gradients(cap, cap.param_names).graph
        assert graph.outputs == g.outputs


class _Shared(nn.Module):
    """One linear layer applied twice: its gradient is final only after the first use's backward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


@pytest.mark.parametrize("remat", [False, True], ids=["autograd", "remat"])
def test_a_parameter_used_twice_is_updated_once_after_its_last_use(remat):
    torch.manual_seed(0)
    model = _Shared()
    initial = copy.deepcopy(model.state_dict())
    step = memfit.remat.compile(model, _xent, _batch(0), budget=0.9) if remat else None
    results = []
    for in_backward in (False, True):
        model.load_state_dict(initial)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        handle = _train(model, opt, 3, remat=step, in_backward=in_backward)
        if handle is not None:
            assert handle.updates == 3 * 6  # six parameter tensors, each updated once per step
            handle.remove()
        results.append(copy.deepcopy(dict(model.named_parameters())))
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


@pytest.mark.slow
def test_tied_embeddings_are_updated_once_after_their_last_use():
    """A GPT's wte is read by the embedding and the LM head: its update must wait for both gradients."""
    from memfit.models._gpt import GPT, GPTConfig, lm_loss

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
    torch.manual_seed(0)
    model = GPT(cfg)
    initial = copy.deepcopy(model.state_dict())
    step = memfit.remat.compile(model, lm_loss, batch, budget=0.9)
    results = []
    for in_backward, remat in [(False, False), (True, False), (False, True), (True, True)]:
        model.load_state_dict(initial)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        handle = step_in_backward(opt) if in_backward else None
        for _ in range(2):
            step(batch) if remat else lm_loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        if handle is not None:
            handle.remove()
        results.append(copy.deepcopy(dict(model.named_parameters())))
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n  # autograd: in backward == ordinary
        assert torch.equal(results[2][n], results[3][n]), n  # remat: in backward == ordinary


def test_dropout_under_remat_in_backward_equals_eager_and_leaves_the_rng_where_eager_does():
    """A model with dropout: the generator's state after the step stays a graph output when gradients are
    consumed (the lowering once failed with 'native_dropout_..._rng is used but not resident'); parameters and
    the RNG after two steps equal eager autograd's ordinary loop at the same seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.Dropout(0.1),
                          nn.Linear(64, 5))  # fmt: skip
    initial = copy.deepcopy(model.state_dict())
    step = memfit.remat.compile(model, _xent, _batch(0), budget="min")
    results = []
    for in_backward, remat in [(False, False), (True, True)]:
        model.load_state_dict(initial)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        handle = step_in_backward(opt) if in_backward else None
        torch.manual_seed(123)
        for i in range(2):
            step(_batch(i)) if remat else _xent(model, _batch(i)).backward()
            opt.step()
            opt.zero_grad()
        if handle is not None:
            assert handle.updates == 2 * 6
            handle.remove()
        results.append((copy.deepcopy(dict(model.named_parameters())), torch.get_rng_state()))
    (p1, rng1), (p2, rng2) = results
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(rng1, rng2)
