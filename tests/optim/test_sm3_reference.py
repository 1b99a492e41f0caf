"""SM3 against the float64 reference of the paper's equations, and the invariants of the method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sm3_reference import ReferenceSM3

from memfit.optim import SM3
from memfit.optim._sm3_math import second_moment

SHAPES = [(), (7,), (5, 3), (4, 3, 2), (2, 3, 2, 5)]
CONFIGS = [
    {"variant": "II", "beta2": 1.0, "momentum": 0.0},
    {"variant": "II", "beta2": 1.0, "momentum": 0.9},
    {"variant": "I", "beta2": 1.0, "momentum": 0.0},
    {"variant": "I", "beta2": 1.0, "momentum": 0.9},
    {"variant": "II", "beta2": 0.9, "momentum": 0.0},
    {"variant": "II", "beta2": 0.9, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
]
PATHS = {"for-loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True}}


def _state_vectors(opt, p):
    st_ = opt.state[p]
    if p.dim() <= 1:
        return [st_["accumulator"].reshape(-1)]
    return [st_[f"accumulator_{k}"].reshape(-1) for k in range(p.dim())]


def _grad(rng, shape):
    g = rng.standard_normal(shape)
    if g.ndim >= 1 and g.size > 1:
        g.reshape(-1)[:: max(2, g.size // 3)] = 0.0  # zero-gradient coordinates exercise the 0/0 = 0 rule
    return g


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, config, path):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(shape)
    p = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    opt = SM3([p], lr=0.05, eps=1e-30, **config, **PATHS[path])
    ref = ReferenceSM3(w0, lr=0.05, eps=1e-30, **config)
    for _ in range(4):
        g = _grad(rng, shape)
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        ref.step(g)
        np.testing.assert_allclose(p.detach().numpy(), ref.w, rtol=1e-12, atol=1e-300)
        for got, want in zip(_state_vectors(opt, p), ref.accumulators(), strict=True):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("config", CONFIGS[:5], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("shape", [(), (7,), (33, 70), (5, 3)], ids=str)
def test_fused_float32_matches_reference(shape, config):
    """The fused CPU kernel (float32 only) against the float64 reference, to float32 accuracy."""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(shape).astype(np.float32)
    p = torch.tensor(w0, requires_grad=True)
    opt = SM3([p], lr=0.05, fused=True, **config)
    ref = ReferenceSM3(w0, lr=0.05, **config)
    for _ in range(4):
        g = _grad(rng, shape).astype(np.float32)
        p.grad = torch.tensor(g)
        opt.step()
        ref.step(g)
    np.testing.assert_allclose(p.detach().numpy(), ref.w, rtol=2e-5, atol=2e-6)
    for got, want in zip(_state_vectors(opt, p), ref.accumulators(), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------- invariants (hypothesis)
_shapes = st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple)


def _grads(draw_shape, seed, steps):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(draw_shape, generator=gen, dtype=torch.float64) * (t + 1) for t in range(steps)]


def _run_nu(grads, variant, beta2=1.0):
    shape = grads[0].shape
    accs = [torch.zeros([n if d == k else 1 for d in range(len(shape))], dtype=torch.float64)
            for k, n in enumerate(shape)]  # fmt: skip
    nus, acc_hist = [], []
    for g in grads:
        nu, new = second_moment(g, accs, variant=variant, beta2=beta2)
        accs = [a.clone() for a in new]
        nus.append(nu.clone())
        acc_hist.append(accs)
    return nus, acc_hist


@settings(max_examples=40, deadline=None)
@given(shape=_shapes, seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 4))
def test_sm3_ii_is_tighter_than_i_and_dominates_adagrad(shape, seed, steps):
    grads = _grads(shape, seed, steps)
    nu_ii, _ = _run_nu(grads, "II")
    nu_i, _ = _run_nu(grads, "I")
    adagrad = torch.zeros(shape, dtype=torch.float64)
    for g, a, b in zip(grads, nu_ii, nu_i, strict=True):
        adagrad = adagrad + g * g
        tol = 1e-12 * adagrad.abs().max()
        assert torch.all(a <= b + tol), "SM3-II's nu must not exceed SM3-I's (paper, Prop. 3)"
        assert torch.all(a >= adagrad - tol), "SM3-II's nu must upper-bound Adagrad's sum of squares"
        assert torch.all(b >= adagrad - tol), "SM3-I's nu must upper-bound Adagrad's sum of squares"


@settings(max_examples=40, deadline=None)
@given(shape=_shapes, seed=st.integers(0, 2**31 - 1), variant=st.sampled_from(["I", "II"]))
def test_accumulators_non_decreasing_and_zero_grad_is_noop(shape, seed, variant):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = SM3([p], lr=0.1, momentum=0.0, variant=variant, fused=False)
    prev = None
    for _ in range(3):
        p.grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        opt.step()
        cur = [a.clone() for a in _state_vectors(opt, p)]
        if prev is not None:
            for a, b in zip(prev, cur, strict=True):
                assert torch.all(b >= a)
        prev = cur
    w = p.detach().clone()
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), w)
    for a, b in zip(prev, _state_vectors(opt, p), strict=True):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1), scalar=st.booleans())
def test_rank_le_1_is_adagrad(n, seed, scalar):
    gen = torch.Generator().manual_seed(seed)
    shape = () if scalar else (n,)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    p1 = w0.clone().requires_grad_()
    p2 = w0.clone().requires_grad_()
    sm3 = SM3([p1], lr=0.3, momentum=0.0, eps=0.0, fused=False)
    ada = torch.optim.Adagrad([p2], lr=0.3, initial_accumulator_value=0.0, eps=1e-300)
    for _ in range(4):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        p1.grad, p2.grad = g.clone(), g.clone()
        sm3.step()
        ada.step()
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-15)
