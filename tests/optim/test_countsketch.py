"""CountSketchAdam: state sizes, equality with Adam without collisions, sketch guarantees, training."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from memfit.optim import CountSketchAdam


def _state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")


@pytest.mark.parametrize(("hashes", "ratio"), [(3, 0.2), (1, 0.5), (4, 1.0)])
def test_state_bytes_match_sketch_sizes(hashes, ratio):
    model = nn.Sequential(nn.Embedding(101, 12), nn.Linear(12, 7))
    opt = CountSketchAdam(model.parameters(), hashes=hashes, sketch_ratio=ratio)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    expected = 0
    for p in model.parameters():
        if p.dim() >= 2:
            buckets = math.ceil(ratio * p.shape[0] - 1e-9)
            expected += 2 * hashes * buckets * (p.numel() // p.shape[0]) * 4
        else:
            expected += 2 * p.numel() * 4
    assert _state_bytes(opt) == expected
    if ratio == 0.2:
        adam_bytes = sum(2 * p.numel() * 4 for p in model.parameters())
        assert _state_bytes(opt) < 0.65 * adam_bytes


@pytest.mark.parametrize("hashes", [1, 3])
def test_ratio_one_without_collisions_equals_adam(hashes):
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 4))
    m2 = copy.deepcopy(m1)
    o1 = CountSketchAdam(m1.parameters(), lr=1e-2, weight_decay=0.01, hashes=hashes, sketch_ratio=1.0)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    for s in range(5):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(s))
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_count_min_never_underestimates_and_count_sketch_is_unbiased_over_seeds():
    """Second-moment query >= the exact EMA (count-min); first-moment error averages out over seeds."""
    rows, cols = 64, 3
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(rows, cols, generator=gen) for _ in range(3)]
    exact_v = torch.zeros(rows, cols)
    exact_m = torch.zeros(rows, cols)
    for g in grads:
        exact_m = 0.9 * exact_m + 0.1 * g
        exact_v = 0.999 * exact_v + 0.001 * g * g
    errors = []
    for seed in range(40):
        p = nn.Parameter(torch.zeros(rows, cols))
        opt = CountSketchAdam([p], hashes=1, sketch_ratio=0.25, seed=seed)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        group = opt.param_groups[0]
        index, sign = opt._hash(seed * 1_000_003 + 1, rows, 16, 1, p.device)
        v = opt.state[p]["exp_avg_sq_sketch"][0][index[0]]
        m = opt.state[p]["exp_avg_sketch"][0][index[0]] * sign[0].view(rows, 1)
        assert torch.all(v >= exact_v - 1e-7), "count-min must never underestimate"
        errors.append(m - exact_m)
        assert group["sketch_ratio"] == 0.25
    mean_err = torch.stack(errors).mean(0)
    spread = torch.stack(errors).std(0) / math.sqrt(len(errors))
    assert torch.all(mean_err.abs() <= 4 * spread + 1e-6), "count sketch estimate must be unbiased"


def test_deterministic_hashing_and_checkpoint_round_trip():
    torch.manual_seed(0)
    m1 = nn.Linear(30, 4)
    m2 = copy.deepcopy(m1)
    o1 = CountSketchAdam(m1.parameters(), seed=7)
    o2 = CountSketchAdam(m2.parameters(), seed=7)
    x = torch.randn(5, 30)
    for m, o in ((m1, o1), (m2, o2)):
        m(x).sum().backward()
        o.step()
    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    buf.seek(0)
    o2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(2):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert "CountSketchAdam (" in repr(copy.deepcopy(o1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"betas": (1.0, 0.9)}, "betas must be in"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"hashes": 0}, "hashes must be an int >= 1"),
        ({"sketch_ratio": 0.0}, r"sketch_ratio must be in \(0, 1\]"),
        ({"sketch_ratio": 1.5}, "sketch_ratio must be in"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
def test_error_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CountSketchAdam([nn.Parameter(torch.zeros(3, 2))], **kwargs)


def _train(make_opt, steps=400):
    """Teacher-student regression with label noise (variance 0.09): a good optimizer ends near 0.09."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(4096, 16)
    y = (teacher(x) + 0.3 * torch.randn(4096, 1)).detach()
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 4096, (128,), generator=gen)
        opt.zero_grad()
        (model(x[idx]) - y[idx]).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        return (model(x) - y).pow(2).mean().item()


@pytest.mark.slow
def test_trains_a_small_model_within_5_percent_of_adam():
    adam = _train(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    sketch = _train(lambda ps: CountSketchAdam(ps, lr=1e-2))
    initial = _train(lambda ps: torch.optim.SGD(ps, lr=0.0), steps=1)
    assert adam < 0.5 * initial, "the task must be learnable for the comparison to mean anything"
    assert sketch <= 1.05 * adam, f"count-sketch Adam loss {sketch:.4f} vs Adam {adam:.4f}"


def test_sparse_gradients_move_only_touched_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(40, 4, sparse=True)
    opt = CountSketchAdam(emb.parameters(), lr=0.1, sketch_ratio=0.25)
    before = emb.weight.detach().clone()
    emb(torch.tensor([3, 3, 17])).sum().backward()
    opt.step()
    changed = (emb.weight.detach() != before).any(dim=1).nonzero().reshape(-1).tolist()
    assert changed == [3, 17]
    assert opt.state[emb.weight]["exp_avg_sketch"].shape == (3, 10, 4)
