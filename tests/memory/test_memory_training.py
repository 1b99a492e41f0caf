"""memfit.memory.track on real training steps, against the model's own tensors and torch's MemTracker."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from memfit._compat import mem_tracker_class
from memfit.memory import CATEGORIES, track


def _storage_bytes(tensors):
    """Bytes of the distinct storages of ``tensors`` (keyed by data pointer: all are real CPU tensors)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
    return sum(seen.values())


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)


def _mlp_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def test_mlp_adam_step_categories_equal_model_tensors():
    model, opt = _mlp()
    x, y = _batch()
    with track(model, opt, inputs=(x, y)) as t:
        loss = _mlp_step(model, opt, x, y)
    r = t.report
    params = list(model.parameters())
    param_bytes = sum(p.numel() * 4 for p in params)  # float32
    state_tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    # Adam after its first step: exp_avg and exp_avg_sq (2x parameters) plus one `step` scalar each.
    moments = sum(2 * p.numel() * 4 for p in params)
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert _storage_bytes(state_tensors) == moments + steps

    assert r.baseline_bytes == param_bytes + x.numel() * 4 + y.numel() * 8
    assert r.baseline_breakdown["parameters"] == param_bytes
    assert r.final_breakdown["parameters"] == param_bytes
    assert r.final_breakdown["gradients"] == _storage_bytes([p.grad for p in params]) == param_bytes
    assert r.final_breakdown["optimizer_state"] == moments + steps
    assert r.final_breakdown["activations"] == 0  # freed by backward
    assert r.final_breakdown["temporaries"] == loss.untyped_storage().nbytes()  # only the loss is left
    # Allocated inside the block and still alive: gradients, Adam state, the loss (parameters are baseline).
    assert r.current_bytes == param_bytes + moments + steps + 4
    assert r.total_peak_bytes == r.baseline_bytes + r.peak_bytes == sum(r.peak_breakdown.values())


def test_mlp_adam_peak_agrees_with_torch_memtracker():
    MemTracker = mem_tracker_class()
    x, y = _batch()
    model, opt = _mlp()
    with track(model, opt, inputs=(x, y)) as t:
        _mlp_step(model, opt, x, y)

    model2, opt2 = _mlp()
    mt = MemTracker()
    mt.track_external(model2, opt2, x, y)
    with mt:
        _mlp_step(model2, opt2, x, y)
    ref_peak = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert abs(t.report.total_peak_bytes - ref_peak) <= 0.02 * ref_peak


def test_second_step_baseline_holds_existing_grads_and_state():
    model, opt = _mlp()
    x, y = _batch()
    _mlp_step(model, opt, x, y)  # creates grads and Adam state outside the block
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    with track(model, opt) as t:
        opt.zero_grad(set_to_none=True)  # frees the baseline gradients inside the block
        t.mark("zeroed")
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    r = t.report
    param_bytes = _storage_bytes(params)
    assert r.baseline_breakdown["parameters"] == param_bytes
    assert r.baseline_breakdown["gradients"] == param_bytes
    assert r.baseline_breakdown["optimizer_state"] == _storage_bytes(state)
    assert r.breakdown_at(r.mark_index("zeroed"))["gradients"] == 0
    assert r.final_breakdown["gradients"] == param_bytes
    # Adam updates its state in place: no new state bytes.
    assert r.final_breakdown["optimizer_state"] == _storage_bytes(state)


def _transformer(seed=0, d=32, layers=2, dropout=0.1):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=dropout, batch_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
        nn.LayerNorm(d),
        nn.Linear(d, 16),
    )
    return model


def _saved_activation_bytes(model, x, y):
    """Independent reference: bytes of the distinct storages autograd saves in one forward pass,
    excluding parameters and the inputs, collected with the test's own saved-tensor hooks."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    saved = []

    def pack(t):
        saved.append(t.detach())
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    acts = [t for t in saved if t.untyped_storage().data_ptr() not in exclude]
    return _storage_bytes(acts), loss


def test_transformer_step_breakdown_is_consistent():
    model = _transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 16, 32)
    y = torch.randint(0, 16, (4, 16))
    with track(model, opt, inputs=(x, y)) as t:
        torch.manual_seed(5)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        t.mark("forward done")
        loss.backward()
        t.mark("backward done")
        opt.step()
    r = t.report

    # Categories sum to the total at every timeline point, and the peak is the maximum of that total.
    grid = np.stack([r.timeline[c] for c in CATEGORIES])
    assert (grid >= 0).all()
    np.testing.assert_array_equal(grid.sum(axis=0), r.timeline_total)
    assert r.timeline_total.max() == r.total_peak_bytes == sum(r.peak_breakdown.values())
    assert r.timeline_total[-1] == r.baseline_bytes + r.current_bytes == sum(r.final_breakdown.values())

    params = list(model.parameters())
    param_bytes = _storage_bytes(params)
    fwd = r.breakdown_at(r.mark_index("forward done"))
    bwd = r.breakdown_at(r.mark_index("backward done"))
    # After forward: parameters, inputs and the saved activations (same dropout masks: same seed).
    model_ref = _transformer()
    torch.manual_seed(5)
    act_ref, loss_ref = _saved_activation_bytes(model_ref, x, y)
    assert torch.equal(loss_ref, loss)
    assert fwd["activations"] == act_ref
    assert fwd["parameters"] == param_bytes and fwd["gradients"] == 0 and fwd["optimizer_state"] == 0
    # After backward: activations released, one gradient per parameter.
    assert bwd["activations"] == 0
    assert bwd["gradients"] == _storage_bytes([p.grad for p in params]) == param_bytes
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert r.final_breakdown["optimizer_state"] == _storage_bytes(state)
    assert r.final_breakdown["inputs"] == r.baseline_breakdown["inputs"] == x.nbytes + y.nbytes


def test_transformer_peak_agrees_with_torch_memtracker():
    MemTracker = mem_tracker_class()
    x = torch.randn(4, 16, 32)
    y = torch.randint(0, 16, (4, 16))

    def step(model, opt):
        torch.manual_seed(5)
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()

    model = _transformer()
    opt = torch.optim.Adam(model.parameters())
    with track(model, opt, inputs=(x, y)) as t:
        step(model, opt)
    model2 = _transformer()
    opt2 = torch.optim.Adam(model2.parameters())
    mt = MemTracker()
    mt.track_external(model2, opt2, x, y)
    with mt:
        step(model2, opt2)
    ref_peak = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert abs(t.report.total_peak_bytes - ref_peak) <= 0.02 * ref_peak


def test_model_without_optimizer_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    x = torch.randn(16, 8)
    with track(model) as t:
        model(x).sum().backward()
    r = t.report
    buf_bytes = _storage_bytes(list(model.buffers()))
    assert r.baseline_breakdown["buffers"] == buf_bytes == (8 + 8) * 4 + 8  # mean, var, num_batches
    assert r.final_breakdown["gradients"] == _storage_bytes([p.grad for p in model.parameters()])


@pytest.mark.gpu
def test_cuda_step_records_allocator_peak():
    torch.cuda.init()
    model, opt = _mlp()
    model.cuda()
    opt = torch.optim.Adam(model.parameters())
    x, y = (v.cuda() for v in _batch())
    # Warm up first: cuBLAS allocates its workspace (tens of MiB, counted by the allocator) on the first
    # matmul and keeps it; after this it is part of the entry state, as it is in a training loop.
    _mlp_step(model, opt, x, y)
    torch.cuda.synchronize()
    with track(model, opt, inputs=(x, y)) as t:
        _mlp_step(model, opt, x, y)
    r = t.report
    assert "cuda" in r.devices
    assert r.cuda_max_allocated_bytes is not None and r.cuda_entry_allocated_bytes is not None
    # The allocator rounds every block up to 512 B and sees kernel workspaces we do not: it can only be
    # at or above our storage-byte peak, and the rounding bounds the gap for this small step.
    assert r.cuda_max_allocated_bytes >= r.peak_bytes
    assert r.cuda_max_allocated_bytes <= r.peak_bytes * 1.5 + 8 * 2**20


def test_fake_tensor_step_matches_the_real_step():
    # The planner's use: measure a step without allocating. Under FakeTensorMode every storage has the
    # nominal size of the real one, so the whole report must equal the real step's, byte for byte.
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        model, opt = _mlp()
        x, y = _batch()
        with track(model, opt, inputs=(x, y)) as t:
            _mlp_step(model, opt, x, y)
        return t.report

    real = run()
    with FakeTensorMode():
        fake = run()
    assert fake.devices == ("cpu",)  # fake tensors report the device they stand for
    assert fake.total_peak_bytes == real.total_peak_bytes
    assert fake.peak_breakdown == real.peak_breakdown
    assert fake.final_breakdown == real.final_breakdown


def test_sparse_embedding_gradient_is_counted_by_its_indices_and_values():
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 16, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    idx = torch.tensor([[1, 5, 7, 5, 900]])
    with track(emb, opt) as t:
        emb(idx).sum().backward()
        opt.step()
    g = emb.weight.grad
    assert g.layout is torch.sparse_coo
    expected = _storage_bytes([g._indices(), g._values()])
    assert expected == 5 * 8 + 5 * 16 * 4  # int64 indices, float32 rows (uncoalesced: 5 entries)
    assert t.report.final_breakdown["gradients"] == expected
    assert t.report.final_breakdown["parameters"] == 1000 * 16 * 4


@settings(max_examples=20, deadline=None)
@given(
    widths=st.lists(st.integers(1, 48), min_size=2, max_size=4),
    batch=st.integers(1, 16),
    optimizer=st.sampled_from(["adam", "sgd_momentum", "adagrad"]),
    bias=st.booleans(),
)
def test_random_mlp_steps_categories_and_peak(widths, batch, optimizer, bias):
    MemTracker = mem_tracker_class()

    def make():
        torch.manual_seed(0)
        layers = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
        model = nn.Sequential(*layers)
        if optimizer == "adam":
            opt = torch.optim.Adam(model.parameters())
        elif optimizer == "sgd_momentum":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = torch.optim.Adagrad(model.parameters())
        return model, opt

    x = torch.randn(batch, widths[0])

    def step(model, opt):
        model(x).square().sum().backward()
        opt.step()

    model, opt = make()
    with track(model, opt, inputs=x) as t:
        step(model, opt)
    r = t.report
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert r.final_breakdown["parameters"] == _storage_bytes(params)
    assert r.final_breakdown["gradients"] == _storage_bytes([p.grad for p in params])
    assert r.final_breakdown["optimizer_state"] == _storage_bytes(state)
    assert r.final_breakdown["inputs"] == x.nbytes
    grid = np.stack([r.timeline[c] for c in CATEGORIES])
    np.testing.assert_array_equal(grid.sum(axis=0), r.timeline_total)

    model2, opt2 = make()
    mt = MemTracker()
    mt.track_external(model2, opt2, x)
    with mt:
        step(model2, opt2)
    ref_peak = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert abs(r.total_peak_bytes - ref_peak) <= 0.02 * ref_peak


def test_gradient_assigned_without_an_op_is_found_by_the_exit_scan():
    model = nn.Linear(4, 4, bias=False)
    g = torch.ones(4, 4)  # made before the block, not part of the model yet: not in the baseline
    with track(model) as t:
        model.weight.grad = g  # no ATen op: only the scan at exit can see it
    r = t.report
    assert r.n_ops == 0
    assert r.baseline_bytes == 64  # the weight
    assert list(r.timeline["gradients"]) == [0, 64]  # entry, exit
    assert r.current_bytes == 64


def test_from_numpy_inside_the_block_is_counted_where_it_is_made():
    with track() as t:
        a = torch.from_numpy(np.ones(10, dtype=np.float64))  # data made outside ATen, lifted by lift_fresh
    assert list(t.report.timeline_total) == [0, 80, 80]
    del a
