"""memfit.remat.compile end to end: budgets, bitwise gradients, measured memory vs prediction, errors."""

import copy

import pytest
import torch

import memfit.remat
from memfit.memory import track
from memfit.remat import InfeasibleBudget

from .models import cnn, image_batch, mlp, vector_batch, xent

BUDGETS = [1.0, 0.7, 0.5, 0.3]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _step_and_measure(step, model, batch):
    for p in model.parameters():
        p.grad = None
    with track() as t:
        loss = step(batch)
    return loss, _grads(model), t.report.peak_bytes


def _smallest_feasible(step, batch, method):
    with pytest.raises(InfeasibleBudget) as exc:
        step.with_budget(1, method).prepare(batch)
    return exc.value.min_peak


@pytest.mark.parametrize(
    "make_model, batch",
    [
        (lambda: mlp(width=128, depth=6), vector_batch(256, 128)),
        (lambda: cnn(c=8, blocks=8), image_batch(8, 16)),
    ],
    ids=["mlp", "cnn-bn-residual"],
)
def test_budgets_give_bitwise_gradients_and_measured_peak_matches_prediction(make_model, batch):
    torch.manual_seed(0)
    model = make_model()
    # the reference: the captured step without recomputation, and eager autograd
    base_model = copy.deepcopy(model)
    base = memfit.remat.compile(base_model, xent, batch)
    base_loss, base_grads, base_peak = _step_and_measure(base, base_model, batch)
    eager = copy.deepcopy(model)
    eager_loss = xent(eager, batch)
    eager_loss.backward()
    torch.testing.assert_close(base_loss, eager_loss.detach())
    for n, p in eager.named_parameters():
        torch.testing.assert_close(base_grads[n], p.grad, rtol=1e-5, atol=1e-6)

    m = copy.deepcopy(model)
    initial = copy.deepcopy(m.state_dict())
    first = memfit.remat.compile(m, xent, batch)
    for budget in [*BUDGETS, _smallest_feasible(first, batch, "budget")]:
        m.load_state_dict(initial)  # BatchNorm statistics as before the step
        step = first.with_budget(budget)  # the same capture, another schedule
        step.prepare(batch)
        plan = step.plan
        assert plan.peak_bytes <= plan.budget_bytes
        loss, grads, measured = _step_and_measure(step, m, batch)
        assert torch.equal(loss, base_loss), budget
        for n in base_grads:
            assert torch.equal(grads[n], base_grads[n]), (budget, n)
        # measured by live-tensor accounting: within 10% of the prediction, and within the budget + 10%
        assert measured == pytest.approx(plan.peak_bytes, rel=0.10), (budget, measured, plan.peak_bytes)
        assert measured <= 1.10 * plan.budget_bytes
        # buffers (BatchNorm running statistics) are updated exactly once per step, as eager does
        for (name, b), (_, b_ref) in zip(m.named_buffers(), eager.named_buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, msg=name)
    assert base_peak == pytest.approx(base.plan.peak_bytes, rel=0.10)


def test_gradients_accumulate_like_backward():
    torch.manual_seed(0)
    model = mlp(width=32, depth=6)
    batch = vector_batch(256, 32)
    step = memfit.remat.compile(model, xent, batch, budget=0.5)
    step(batch)
    once = _grads(model)
    step(batch)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n])


def test_a_new_batch_shape_is_captured_again_and_cached():
    torch.manual_seed(0)
    model = mlp(width=32, depth=6)
    step = memfit.remat.compile(model, xent, vector_batch(256, 32), budget=0.6)
    first = step.captured
    step(vector_batch(192, 32))
    second = step.captured
    assert second is not first
    step(vector_batch(256, 32))
    assert step.captured is first


def test_dropout_model_trains_like_eager_autograd_with_and_without_recomputation():
    """Dropout draws eager autograd's masks at the same generator state, also where it is recomputed: training
    with recomputation gives the loss curve of training without, bit for bit, and eager autograd's curve."""
    torch.manual_seed(0)
    model = mlp(width=32, depth=4, dropout=0.2)
    x, _ = vector_batch(256, 32)
    batch = (x, x[:, :10].argmax(dim=1))  # a learnable target
    step = memfit.remat.compile(model, xent, batch, budget=0.4)
    computes = [v for kind, v in step.schedule.events if kind == "compute"]
    random_nodes = [v for v, r in enumerate(step.captured.refs) if r is not None and r.random is not None]
    assert random_nodes and any(computes.count(v) > 1 for v in random_nodes)  # masks recomputed
    twin = copy.deepcopy(model)
    twin_step = memfit.remat.compile(twin, xent, batch)
    eager = copy.deepcopy(model)
    curves = []
    for m, st in ((model, step), (twin, twin_step), (eager, None)):
        torch.manual_seed(1)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        losses = []
        for _ in range(25):
            opt.zero_grad(set_to_none=True)
            if st is None:
                loss = xent(m, batch)
                loss.backward()
                losses.append(float(loss))
            else:
                losses.append(float(st(batch)))
            opt.step()
        curves.append(losses)
    assert curves[0] == curves[1]
    assert curves[0] == pytest.approx(curves[2], rel=1e-4)
    assert curves[0][-1] < 0.7 * curves[0][0]


def test_budget_below_what_the_step_needs_names_the_smallest_feasible_budget():
    torch.manual_seed(0)
    model = mlp(width=32, depth=3)
    batch = vector_batch(16, 32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InfeasibleBudget) as exc:
        memfit.remat.compile(model, xent, batch, budget=10)
    err = exc.value
    assert err.min_peak > 10 and f"{err.min_peak:,} bytes" in str(err)  # the number, not an attribute's name
    # one unchained error, in compile's terms: fractions of the non-input no-remat peak, what cannot be reduced
    assert err.__cause__ is None and err.__suppress_context__
    assert err.min_peak_bytes == err.min_peak
    assert err.min_fraction == pytest.approx(err.min_peak / err.reference_bytes)
    assert "gradients (inside the budget)" in str(err) and 'budget="min"' in str(err)
    least = memfit.remat.compile(model, xent, batch, budget="min")
    assert least.plan.peak_bytes <= err.min_peak
    # the smallest feasible budget it names is feasible
    step = memfit.remat.compile(model, xent, batch, budget=err.min_peak)
    assert step.plan.peak_bytes <= err.min_peak
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "budget, error", [(0.0, ValueError), (1.5, ValueError), (-5, ValueError), ("1GB", TypeError)]
)
def test_malformed_budgets_are_rejected_before_capture(budget, error):
    with pytest.raises(error, match="budget"):
        memfit.remat.compile(torch.nn.Linear(2, 2), lambda m, b: m(b).sum(), torch.randn(2, 2), budget=budget)


def test_plan_report_says_what_was_decided(capsys):
    torch.manual_seed(0)
    model = mlp(width=32, depth=6)
    step = memfit.remat.compile(model, xent, vector_batch(256, 32), budget=0.5)
    text = step.report()
    assert "predicted peak" in text and "budget" in text
    assert capsys.readouterr().out.strip() == text.strip()
    d = step.plan.to_dict()
    assert d["peak_bytes"] <= d["budget_bytes"] <= d["noremat_peak_bytes"]
    assert d["cost_overhead"] >= 1.0


def test_given_rates_price_the_capture_and_carry_over_to_other_budgets():
    """``rates=`` replaces the calibrated speeds (one ``Rates`` in every process: the same plan in each)."""
    torch.manual_seed(0)
    model = mlp(width=32, depth=4)
    batch = vector_batch(64, 32)
    fast = memfit.remat.Rates(flops_per_s=1e12, bytes_per_s=1e11, op_overhead_s=1e-6)
    slow = memfit.remat.Rates(flops_per_s=1e7, bytes_per_s=1e11, op_overhead_s=1e-6)
    steps = {r: memfit.remat.compile(model, xent, batch, rates=r) for r in (fast, slow)}
    totals = {}
    for r, step in steps.items():
        g = step.captured.graph
        totals[r] = sum(g.cost(v) for v in range(len(g)))
        other = step.with_budget(0.5)
        other.prepare(batch)
        assert other.rates is r and other.captured is step.captured
    # 4 + 1 linear layers of 32 (or 10) outputs, forward and backward: the matmul FLOPs alone at the slow rate
    assert totals[slow] > totals[fast] + 0.9 * (2 * 64 * 32 * 32 * 3 * 4) / 1e7
    with pytest.raises(TypeError, match=r"memfit\.remat\.Rates"):
        memfit.remat.compile(model, xent, batch, rates={"flops_per_s": 1e9})


def test_with_budget_reuses_the_capture_and_honours_the_new_budget():
    torch.manual_seed(0)
    model = mlp(width=32, depth=6)
    batch = vector_batch(256, 32)
    step = memfit.remat.compile(model, xent, batch)
    tight = step.with_budget(0.5)
    tight.prepare(batch)
    assert tight.captured is step.captured
    assert step.plan.budget_bytes is None
    assert tight.plan.peak_bytes <= tight.plan.budget_bytes <= 0.5 * step.plan.peak_bytes + 1
    with pytest.raises(ValueError, match="budget"):
        step.with_budget(2.0)
