"""Regressions for the bugs found in public SM3 ports, and the sparse path against its reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sm3_reference import sparse_reference_step
from torch import nn

from memfit.optim import SM3


def _sparse_grad(rows, values, shape):
    idx = torch.tensor([rows], dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.as_tensor(values), shape, check_invariants=True)


@pytest.mark.parametrize(("variant", "beta2"), [("II", 1.0), ("II", 0.8), ("I", 1.0)])
@pytest.mark.parametrize("dim", [8, None], ids=["table", "vector"])
def test_sparse_updates_touched_rows_only_with_duplicates_coalesced(variant, beta2, dim):
    rng = np.random.default_rng(0)
    shape = (20, dim) if dim else (20,)
    w0 = rng.standard_normal(shape)
    p = nn.Parameter(torch.tensor(w0))
    opt = SM3([p], lr=0.1, momentum=0.9, beta2=beta2, variant=variant)
    acc = np.zeros(20)
    w = w0.copy()
    for step in range(3):
        rows = [3, 7, 3, 11 + step]  # row 3 twice: must be summed before squaring
        vals = rng.standard_normal((4, *shape[1:]))
        p.grad = _sparse_grad(rows, vals, shape)
        opt.step()
        w, acc = sparse_reference_step(w, acc, rows, vals, lr=0.1, variant=variant, beta2=beta2)
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-300)
    key = "accumulator_0" if dim else "accumulator"
    np.testing.assert_allclose(opt.state[p][key].reshape(-1).numpy(), acc, rtol=1e-12, atol=0)
    untouched = [r for r in range(20) if r not in (3, 7, 11, 12, 13)]
    assert np.array_equal(p.detach().numpy()[untouched], w0[untouched])
    assert torch.all(opt.state[p][key].reshape(-1)[untouched] == 0)
    assert "momentum_buffer" not in opt.state[p]  # no momentum on the sparse path, and no buffer
    if dim:  # the column accumulator is not used by sparse steps
        assert torch.all(opt.state[p]["accumulator_1"] == 0)


def test_sparse_embedding_end_to_end_keeps_untouched_rows_and_never_densifies():
    torch.manual_seed(0)
    emb = nn.Embedding(50_000, 16, sparse=True)
    opt = SM3(emb.parameters(), lr=0.1)
    idx = torch.tensor([[1, 5, 5, 9]])
    emb(idx).sum().backward()
    opt.step()  # warm up lazily allocated state outside the measurement
    before = emb.weight.detach().clone()
    acc_before = opt.state[emb.weight]["accumulator_0"].clone()
    opt.zero_grad()
    emb(torch.tensor([[2, 5]])).pow(2).sum().backward()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        opt.step()
    table_bytes = emb.weight.numel() * emb.weight.element_size()
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert biggest < table_bytes // 100, f"a step allocated {biggest} bytes: the table was densified"
    changed = (emb.weight.detach() != before).any(dim=1).nonzero().reshape(-1).tolist()
    assert changed == [2, 5]
    acc_after = opt.state[emb.weight]["accumulator_0"].reshape(-1)
    untouched = torch.ones(50_000, dtype=torch.bool)
    untouched[[2, 5]] = False
    assert torch.equal(acc_after[untouched], acc_before.reshape(-1)[untouched])


def test_sparse_rejects_weight_decay_and_multi_dim_sparse_indices():
    p = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"weight_decay=0\.1 is not supported with sparse"):
        opt = SM3([p], weight_decay=0.1)
        p.grad = _sparse_grad([1], torch.ones(1, 3), (4, 3))
        opt.step()
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.ones(1), (4, 3), check_invariants=True)
    with pytest.raises(ValueError, match="sparse_dim\\(\\)=2"):
        SM3([p]).step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-30, 0.0])
def test_low_precision_parameters_give_no_nan(dtype, eps):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 5).to(dtype))
    v = nn.Parameter(torch.randn(5).to(dtype))
    opt = SM3([p, v], lr=0.1, eps=eps)
    for _ in range(3):
        p.grad = torch.randn(6, 5).to(dtype)
        p.grad[:, 0] = 0  # zero-gradient coordinates: 0/0 must give 0, not NaN
        p.grad[0, 1] = 6e4 if dtype == torch.float16 else 1e30  # g^2 overflows in the parameter dtype
        v.grad = torch.zeros(5, dtype=dtype)
        opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(v).all()
    assert opt.state[p]["accumulator_0"].dtype == torch.float32
    assert opt.state[p]["momentum_buffer"].dtype == dtype


def test_no_momentum_buffer_when_momentum_is_zero():
    p = nn.Parameter(torch.randn(3, 4))
    opt = SM3([p], momentum=0.0)
    p.grad = torch.randn(3, 4)
    opt.step()
    assert set(opt.state[p]) == {"step", "accumulator_0", "accumulator_1"}


def test_bf16_momentum_dtype_halves_the_buffer():
    p = nn.Parameter(torch.randn(3, 4))
    opt = SM3([p], momentum=0.9, momentum_dtype=torch.bfloat16)
    p.grad = torch.randn(3, 4)
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.bfloat16 and buf.numel() * buf.element_size() == p.numel() * 2


@pytest.mark.parametrize("shape", [(4,), (3, 4)])
def test_beta2_below_one_really_decays(shape):
    p = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = SM3([p], lr=0.1, momentum=0.0, beta2=0.5)
    p.grad = torch.full(shape, 2.0, dtype=torch.float64)
    opt.step()
    accs = [v.clone() for k, v in sorted(opt.state[p].items()) if k.startswith("accumulator")]
    assert all(torch.all(a == 0.5 * 4.0) for a in accs)  # (1 - beta2) * g^2
    p.grad = torch.zeros(shape, dtype=torch.float64)
    opt.step()
    after = [v for k, v in sorted(opt.state[p].items()) if k.startswith("accumulator")]
    for a, b in zip(accs, after, strict=True):
        assert torch.equal(b, 0.5 * a)  # assigned, not max(old, new): it shrinks


def test_zero_dim_parameters_work():
    p = nn.Parameter(torch.tensor(1.5))
    opt = SM3([p], lr=0.1, momentum=0.0)
    p.grad = torch.tensor(2.0)
    opt.step()
    # Adagrad's first step: w - lr * g / |g|
    assert torch.allclose(p.detach(), torch.tensor(1.4)) and opt.state[p]["accumulator"].shape == ()


def test_fp32_accumulators_survive_a_checkpoint_of_a_bf16_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    opt = SM3(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 8, dtype=torch.bfloat16)).float().pow(2).sum().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = SM3(model.parameters(), lr=0.1)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            loaded = opt2.state[p][key]
            if key.startswith("accumulator"):
                assert loaded.dtype == torch.float32
            assert loaded.dtype == value.dtype and torch.equal(loaded, value), key
