"""Capture a training step, lower schedules of it, and check them against autograd and against each other."""

import copy
import random
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memfit.memory import track
from memfit.remat import UnsupportedGraph, capture, lower, solve
from memfit.remat.eager.capture import module_tensors

from ._schedules import evicting_schedule
from .models import cnn, image_batch, mlp, vector_batch, xent


def _args(model, cap, flat, seed=1234):
    args = module_tensors(model, [*cap.param_names, *cap.buffer_names]) + list(flat)
    return [*args, torch.Generator().manual_seed(seed).get_state()] if cap.n_random else args


def _run(model, cap, schedule, flat, seed=1234):
    """The lowered step's outputs (with random ops: and the generator state it leaves, last)."""
    gm = lower(cap, schedule)
    with torch.no_grad():
        return gm(*_args(model, cap, flat, seed))


def _eager(model, batch):
    m = copy.deepcopy(model)
    loss = xent(m, batch)
    loss.backward()
    return m, loss.detach()


@pytest.mark.parametrize(
    "make_model, batch",
    [(lambda: mlp(width=32, depth=4), vector_batch(16, 32)), (lambda: cnn(c=6, blocks=2), image_batch(4, 8))],
    ids=["mlp", "cnn-bn-residual"],
)
def test_noremat_lowering_equals_captured_graph_bitwise_and_autograd(make_model, batch):
    torch.manual_seed(0)
    model = make_model()
    cap = capture(model, xent, batch)
    with torch.no_grad():
        captured = cap.gm(*_args(model, cap, batch))
    lowered = _run(model, cap, solve(cap.graph, None, method="noremat"), batch)
    assert len(lowered) == len(captured)
    for a, b in zip(lowered, captured, strict=True):
        assert torch.equal(a, b)

    ref, loss = _eager(model, batch)
    torch.testing.assert_close(lowered[cap.loss_index], loss)
    grads = dict(ref.named_parameters())
    assert set(cap.grad_outputs) == {f"model.{n}" for n in grads}
    for name, i in cap.grad_outputs.items():
        torch.testing.assert_close(lowered[i], grads[name.removeprefix("model.")].grad, rtol=1e-5, atol=1e-6)


def test_graph_inputs_outputs_and_views_follow_the_capture():
    torch.manual_seed(0)
    model = cnn(c=4, blocks=1)
    batch = image_batch(2, 8)
    cap = capture(model, xent, batch)
    g = cap.graph
    n_params = sum(1 for _ in model.parameters())
    n_buffers = sum(1 for _ in model.buffers())
    assert len(cap.placeholder_ids) == n_params + n_buffers + 2
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    batch_bytes = sum(t.numel() * t.element_size() for t in batch)
    assert g.input_bytes == param_bytes + buffer_bytes + batch_bytes
    # outputs: the loss, one gradient per parameter, the new value of every buffer (and bases of output views)
    assert set(cap.output_ids) <= set(g.outputs)
    assert len(cap.grad_outputs) == n_params and len(cap.buffer_outputs) == n_buffers
    # a view costs no bytes, and its users depend on its base as well
    views = [v for v, r in enumerate(cap.refs) if r is not None and r.view_of is not None]
    assert views
    for v in views:
        assert g.nbytes(v) == 0
        for u in g.users(v):
            assert cap.refs[v].view_of in g.deps(u)


@settings(max_examples=8, deadline=None)
@given(frac=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_every_valid_schedule_gives_bitwise_identical_results(frac, seed):
    """Recomputation never changes a value: random eviction sets, dropout and LayerNorm included."""
    model, batch, cap, reference = _dropout_setup()
    rng = random.Random(seed)
    evict = {v for v in range(len(cap.graph)) if rng.random() < frac}
    schedule = evicting_schedule(cap.graph, evict)
    out = _run(model, cap, schedule, batch)
    for a, b in zip(out, reference, strict=True):
        assert torch.equal(a, b)


_SETUP: dict = {}


def _dropout_setup():
    if not _SETUP:
        torch.manual_seed(0)
        model = mlp(width=16, depth=3, dropout=0.3)
        batch = vector_batch(8, 16)
        cap = capture(model, xent, batch)
        ref = _run(model, cap, solve(cap.graph, None, method="noremat"), batch)
        _SETUP.update(model=model, batch=batch, cap=cap, ref=ref)
    return _SETUP["model"], _SETUP["batch"], _SETUP["cap"], _SETUP["ref"]


def test_random_ops_are_recomputed_with_the_same_masks_and_draw_what_eager_autograd_draws():
    """Dropout is recomputable: a recomputation replays the generator state its first compute started from. The
    masks are eager autograd's at the same generator state, and the step leaves the generator where eager's
    forward and backward leave it."""
    model, batch, cap, reference = _dropout_setup()
    g = cap.graph
    random_nodes = [v for v, r in enumerate(cap.refs) if r is not None and r.random is not None and not r.rng]
    assert random_nodes and all(g.is_recomputable(v) for v in random_nodes)
    everything = evicting_schedule(g, set(range(len(g))))
    computes = [v for kind, v in everything.events if kind == "compute"]
    assert any(computes.count(v) > 1 for v in random_nodes)  # recomputed...
    again = _run(model, cap, everything, batch, seed=1234)
    for a, b in zip(again, reference, strict=True):  # ...with the same masks
        assert torch.equal(a, b)
    other = _run(model, cap, everything, batch, seed=99)
    assert not torch.equal(other[cap.loss_index], reference[cap.loss_index])
    # eager autograd from the same generator state: the same loss and gradients, the same state after
    torch.manual_seed(1234)
    m = copy.deepcopy(model)
    loss = xent(m, batch)
    loss.backward()
    assert torch.equal(torch.get_rng_state(), again[-1])
    torch.testing.assert_close(again[cap.loss_index], loss.detach())
    for name, i in cap.grad_outputs.items():
        torch.testing.assert_close(again[i], m.get_parameter(name.removeprefix("model.")).grad)


def test_random_ops_are_priced_by_the_elements_they_draw(monkeypatch):
    """With ``Rates.random_elements_per_s``, a dropout costs its elements at that rate and dispatch, not the bytes
    it moves (a CPU generator draws an element in the time 25 bytes stream); without it, bytes as any op."""
    from memfit.remat.eager import costs as capture_module

    torch.manual_seed(0)
    model = mlp(width=16, depth=3, dropout=0.3)
    batch = vector_batch(8, 16)
    base = capture_module.Rates(flops_per_s=1e10, bytes_per_s=1e10, op_overhead_s=1e-6)
    costs = {}
    for rate in (None, 1e7):
        monkeypatch.setitem(capture_module._RATES, "cpu", replace(base, random_elements_per_s=rate))
        cap = capture(model, xent, batch)
        costs[rate] = {
            v: cap.graph.cost(v)
            for v, r in enumerate(cap.refs)
            if r is not None and r.random is not None and not r.rng
        }
        nodes = {r.node for r in cap.refs if r is not None and r.random is not None}
    # a dropout after each of the 3 layers, each with an output, a mask and the generator state after it
    assert len(nodes) == 3 and costs[None].keys() == costs[1e7].keys()
    for v, cost in costs[1e7].items():
        # every output of the op (and the generator state) costs the whole call: 8 x 16 elements drawn
        assert cost == pytest.approx(8 * 16 / 1e7 + 1e-6)
        assert costs[None][v] == pytest.approx((8 * 16 * 4 * 2 + 8 * 16) / 1e10 + 1e-6)


class _Experts(torch.nn.Module):
    """Each token takes its expert's whole weight, as Mixtral's ``batched_mm`` experts do (``w[ids]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 128, 512) * 0.01)

    def forward(self, ids):
        return self.w[ids]


def test_gathers_are_priced_by_their_elements_and_large_outputs_by_their_fresh_pages(monkeypatch):
    """With ``Rates.gather_elements_per_s``, ``aten.index`` costs its output's elements and the ``index_put`` of its
    backward its values' elements at that rate, not their bytes; with ``fresh_page_bytes_per_s``, an output of
    ``FRESH_PAGES_FROM`` bytes or more costs its bytes at that rate on top (the capture allocates none of them)."""
    from memfit.remat.eager import costs

    aten = torch.ops.aten
    model = _Experts()
    ids = torch.randint(0, 8, (128,))  # output (128, 128, 512) float32: 32 MiB, FRESH_PAGES_FROM exactly
    n, nbytes = 128 * 128 * 512, 128 * 128 * 512 * 4
    assert nbytes == costs.FRESH_PAGES_FROM

    def loss(m, batch):
        return m(batch).square().sum()

    base = costs.Rates(flops_per_s=1e10, bytes_per_s=1e10, op_overhead_s=1e-6)
    found = {}
    for gather, fresh in ((None, None), (1e8, None), (1e8, 1e9)):
        monkeypatch.setitem(
            costs._RATES, "cpu", replace(base, gather_elements_per_s=gather, fresh_page_bytes_per_s=fresh)
        )
        cap = capture(model, loss, ids)
        by_op = {}
        for v, r in enumerate(cap.refs):
            if r is not None and r.view_of is None:
                by_op.setdefault(r.node.target, []).append(cap.graph.cost(v))
        found[gather, fresh] = by_op
    index, index_put = aten.index.Tensor, aten.index_put.default
    for key in found:
        assert len(found[key][index]) == 1 and len(found[key][index_put]) == 1
    weight, ids_bytes = 8 * 128 * 512 * 4, 128 * 8
    # by their bytes: index reads the weight and the ids and writes its output; index_put reads the zeros, the ids
    # and the values and writes a weight-sized result
    assert found[None, None][index] == [pytest.approx((weight + ids_bytes + nbytes) / 1e10 + 1e-6)]
    assert found[None, None][index_put] == [pytest.approx((2 * weight + ids_bytes + nbytes) / 1e10 + 1e-6)]
    # by their elements: the gathered output, the scattered values
    assert found[1e8, None][index] == [pytest.approx(n / 1e8 + 1e-6)]
    assert found[1e8, None][index_put] == [pytest.approx(n / 1e8 + 1e-6)]
    # index's 32 MiB output is fresh pages; index_put's 2 MiB result is not
    assert found[1e8, 1e9][index] == [pytest.approx(n / 1e8 + nbytes / 1e9 + 1e-6)]
    assert found[1e8, 1e9][index_put] == found[1e8, None][index_put]
    # any op's: the powers (the square, and its derivative in the backward) are the gather's size, the sum a scalar
    powers, plain = found[1e8, 1e9][aten.pow.Tensor_Scalar], found[1e8, None][aten.pow.Tensor_Scalar]
    assert len(powers) == 2 and powers == [pytest.approx(c + nbytes / 1e9) for c in plain]
    assert found[1e8, 1e9][aten.sum.default] == found[1e8, None][aten.sum.default]


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_and_grouped_matmuls_are_priced_by_torchs_formulas(causal):
    """The ops torch's flop counter leaves out get FLOPs: the CPU flash attention kernels as torch counts the CUDA
    ones (halved for a causal mask, whose blocks above the diagonal the CPU kernel skips), a grouped matmul as the
    matmuls of its groups."""
    from torch.utils.flop_counter import flop_registry

    from memfit.remat.eager.costs import extra_flops

    aten = torch.ops.aten
    q, k, v = (torch.empty(2, 4, s, d, device="meta") for s, d in ((16, 8), (12, 8), (12, 6)))
    out, lse = torch.empty(2, 4, 16, 6, device="meta"), torch.empty(2, 4, 16, device="meta")
    share = 0.5 if causal else 1.0
    forward = flop_registry[aten._scaled_dot_product_flash_attention](q, k, v, out_val=(out,))
    backward = flop_registry[aten._scaled_dot_product_flash_attention_backward](
        out, q, k, v, out_val=(q, k, v)
    )
    assert forward > 0 and backward > forward
    assert (
        extra_flops(aten._scaled_dot_product_flash_attention_for_cpu, (q, k, v, 0.0, causal))
        == share * forward
    )
    args = (out, q, k, v, out, lse, 0.0, causal)
    assert extra_flops(aten._scaled_dot_product_flash_attention_for_cpu_backward, args) == share * backward
    # a grouped matmul: rows 0-2 times group 0's matrix, rows 3-9 times group 2's (group 1 empty)
    x, w, offs = (
        torch.empty(10, 8, device="meta"),
        torch.empty(3, 8, 5, device="meta"),
        torch.tensor([3, 3, 10]),
    )
    groups = sum(
        flop_registry[aten.mm](x[a:b], w[g], out_val=torch.empty(b - a, 5, device="meta"))
        for g, (a, b) in enumerate(((0, 3), (3, 3), (3, 10)))
    )
    assert extra_flops(aten._grouped_mm, (x, w, offs)) == groups
    assert extra_flops(aten.mm, (x, w[0])) is None  # torch's counter has it


def test_mixtrals_grouped_experts_are_priced_as_matmuls():
    """Mixtral's ``grouped_mm`` experts, as Hugging Face runs them on a CPU (its ``grouped_mm_fallback`` custom op
    and that op's backward), get the FLOPs of their matmuls."""
    from memfit.remat.eager.costs import _flops

    from .zoo import mixtral

    model, loss_fn, batch = mixtral("tiny", "grouped_mm")
    cap = capture(model, loss_fn, batch)
    found = {}
    for node in cap.gm.graph.nodes:
        name = getattr(getattr(node.target, "overloadpacket", None), "_qualified_op_name", "")
        if name.startswith("transformers::grouped_mm_fallback"):
            x, w = (a.meta["val"] for a in node.args[:2])
            found.setdefault(name, []).append(_flops(node) / (2 * x.shape[0] * x.shape[1] * w.shape[2]))
    assert set(found) == {"transformers::grouped_mm_fallback", "transformers::grouped_mm_fallback_backward"}
    assert set(found["transformers::grouped_mm_fallback"]) == {1.0}
    assert set(found["transformers::grouped_mm_fallback_backward"]) == {2.0}  # input and weight gradients


def test_attention_without_dropout_is_not_random():
    """``scaled_dot_product_attention`` with ``dropout_p=0`` lowers to a flash kernel tagged random; it draws
    nothing, so it is recomputable and runs without generator state."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    cap = capture(Attention(), lambda m, b: m(b).square().mean(), torch.randn(2, 8, 16))
    targets = {str(r.node.target) for r in cap.refs if r is not None}
    assert any("flash_attention" in t for t in targets), targets
    assert cap.n_random == 0 and cap.rng_device is None
    assert all(cap.graph.is_recomputable(v) for v in range(len(cap.graph)) if not cap.graph.is_input(v))


def test_measured_peak_of_noremat_step_equals_prediction():
    torch.manual_seed(0)
    model = mlp(width=64, depth=4)
    batch = vector_batch(64, 64)
    cap = capture(model, xent, batch)
    schedule = solve(cap.graph, None, method="noremat")
    gm = lower(cap, schedule)
    args = _args(model, cap, batch)
    with torch.no_grad(), track() as t:
        out = gm(*args)
        del out
    predicted = schedule.simulate().peak - cap.graph.input_bytes
    assert t.report.peak_bytes == pytest.approx(predicted, rel=0.02)


def test_profile_costs_are_measured_seconds():
    torch.manual_seed(0)
    model = mlp(width=32, depth=2)
    batch = vector_batch(8, 32)
    cap = capture(model, xent, batch, cost="profile")
    g = cap.graph
    costs = [g.cost(v) for v in range(len(g)) if not g.is_input(v)]
    assert all(c >= 0 for c in costs) and sum(costs) > 0
    assert sum(costs) < 5.0  # seconds for a step of a tiny MLP


def test_untraceable_model_gives_a_clear_error_and_leaves_the_model_untouched():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            if h.sum() > 0:  # data-dependent Python control flow cannot be captured
                return h
            return -h

    model = DataDependent()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedGraph, match="cannot capture"):
        capture(model, lambda m, b: m(b).sum(), torch.randn(2, 4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_in_place_mutation_of_the_batch_is_rejected():
    model = torch.nn.Linear(4, 4)

    def mutating_loss(m, b):
        b.mul_(2)
        return m(b).sum()

    batch = torch.randn(2, 4)
    before = batch.clone()
    with pytest.raises(UnsupportedGraph, match="mutates its batch"):
        capture(model, mutating_loss, batch)
    assert torch.equal(batch, before)


def test_bad_arguments_are_reported():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        capture(lambda x: x, xent, torch.randn(2, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cost must be"):
        capture(model, lambda m, b: m(b).sum(), torch.randn(2, 4), cost="guess")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batch must be a tensor"):
        capture(model, lambda m, b: m(b[0]).sum(), (torch.randn(2, 4), "label"))
    with pytest.raises(ValueError, match="scalar"):
        capture(model, lambda m, b: m(b), torch.randn(2, 4))


_RSS_PROBE = r"""
import json, sys
from pathlib import Path
import torch
from torch import nn
import memfit.remat
from memfit.remat.eager.costs import _calibrate

def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.GELU()) for _ in range(4)])
batch = torch.randn(65536, 1024)  # 256 MiB; each activation of the step is as large
_calibrate(torch.device("cpu"))
memfit.remat.capture(model, lambda m, b: m(b).pow(2).mean(), batch)  # first trace: imports, caches
Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
before = kib("VmRSS")
cap = memfit.remat.capture(model, lambda m, b: m(b).pow(2).mean(), batch)
grown = (kib("VmHWM") - before) * 1024
step = memfit.remat.solve(cap.graph, None, method="noremat").simulate().peak - cap.graph.input_bytes
print(json.dumps({"grown": grown, "step": step}))
"""


def test_capture_allocates_no_activation_memory():
    """Capture traces with fake tensors: the process's RSS (glibc returning large blocks to the OS, so RSS follows
    live tensors) grows by a small fraction of what the step itself needs."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, env=env, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["step"] > 2 * 2**30
    assert got["grown"] < 0.02 * got["step"], got


_BN: dict = {}


def _bn_setup():
    """A CNN with BatchNorm, a max-pool with indices and convolutions (multi-output ops in forward and backward)."""
    if not _BN:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 10),
        )  # fmt: skip
        batch = image_batch(4, 8)
        cap = capture(model, xent, batch)
        ref = _run(model, cap, solve(cap.graph, None, method="noremat"), batch)
        _BN.update(cap=cap, model=model, batch=batch, ref=ref)
    return _BN["cap"], _BN["model"], _BN["batch"], _BN["ref"]


@settings(max_examples=6, deadline=None)
@given(frac=st.floats(0.1, 1.0), seed=st.integers(0, 10_000))
@example(frac=1.0, seed=0)
def test_multi_output_ops_run_once_per_call_and_the_cost_counts_the_calls(frac, seed):
    """The lowered module calls a multi-output op (BatchNorm, convolution_backward, max-pool with indices) once for
    sibling outputs computed back to back, and ``call_cost`` charges exactly the calls the module makes."""
    from memfit.remat.eager.lower import _groups, call_cost

    cap, model, batch, reference = _bn_setup()
    rng = random.Random(seed)
    schedule = evicting_schedule(cap.graph, {v for v in range(len(cap.graph)) if rng.random() < frac})
    gm = lower(cap, schedule)
    groups = _groups(cap)
    aten = torch.ops.aten
    assert {n.target for n in groups} >= {
        aten.convolution_backward.default,
        aten.max_pool2d_with_indices.default,
    }
    # an independent count from the events: a compute of a group member starts a call unless it continues the run
    # of its siblings' computes (frees in between allowed)
    expected: dict[str, int] = {}
    cost = 0.0
    run_node, run_done = None, set()
    for kind, v in schedule.events:
        if kind != "compute":
            continue
        ref = cap.refs[v]
        node = ref.node if ref is not None and ref.node in groups else None
        if node is not None and node is run_node and v not in run_done:
            run_done.add(v)
            continue
        run_node, run_done = node, {v}
        cost += cap.graph.cost(v)
        if node is not None:
            expected[node.name] = expected.get(node.name, 0) + 1
    lowered: dict[str, int] = {}
    for n in gm.graph.nodes:
        source = n.meta.get("memfit_source")
        if n.op == "call_function" and source in expected:
            lowered[source] = lowered.get(source, 0) + 1
    assert lowered == expected
    if frac == 1.0:  # everything evicted: some op runs more than once (the check above saw split siblings)
        assert sum(expected.values()) > len(groups)
    assert call_cost(cap, schedule) == pytest.approx(cost, rel=1e-12)
    with torch.no_grad():
        out = gm(*_args(model, cap, batch))
    for a, b in zip(out, reference, strict=True):
        assert torch.equal(a, b)


class _Tied(torch.nn.Module):
    """A tied embedding/head (one parameter, two names), a bias registered twice and used under one name only (as
    BERT's ``cls.predictions.bias``), and a branch that HF-style code takes only outside ``torch.compile``: a
    data-dependent shortcut on the mask that no trace can follow."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.head = torch.nn.Linear(8, 20)
        self.head.weight = self.embed.weight
        self.decoder_bias = torch.nn.Parameter(torch.randn(20))
        self.head.bias = self.decoder_bias  # a second name for it, used through head only

    def forward(self, ids, mask):
        h = self.embed(ids)
        if torch.compiler.is_compiling() or not bool(mask.all()):  # HF's masking_utils shape of test
            h = h * mask.unsqueeze(-1)
        return self.head(h)


def test_tied_parameters_get_one_input_and_the_summed_gradient_and_hf_style_branches_trace():
    torch.manual_seed(0)
    model = _Tied()
    ids = torch.randint(0, 20, (3, 5))
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(*b).flatten(0, 1), b[0].flatten())

    cap = capture(model, loss_fn, (ids, mask))
    assert len(cap.param_names) == len(list(model.parameters())) == 2  # one input per tensor
    assert len(cap.placeholder_ids) == 2 + 2
    out = _run(model, cap, solve(cap.graph, None, method="noremat"), (ids, mask))
    ref = copy.deepcopy(model)
    loss_fn(ref, (ids, mask)).backward()
    for name, i in cap.grad_outputs.items():  # embedding + head uses of the tied weight, summed
        torch.testing.assert_close(out[i], ref.get_parameter(name.removeprefix("model.")).grad)
    step_model = copy.deepcopy(model)
    import memfit.remat

    memfit.remat.compile(step_model, loss_fn, (ids, mask))((ids, mask))
    assert step_model.head.weight.grad is step_model.embed.weight.grad  # every name sees the gradient
    torch.testing.assert_close(step_model.head.bias.grad, ref.decoder_bias.grad)


def test_calibration_under_a_fake_tensor_mode_measures_real_tensors():
    """The compiled path calibrates inside torch.compile's partitioner, under a FakeTensorMode: the rates must be
    the real ones (fake ops take no time per FLOP and a millisecond of dispatch each)."""
    from memfit import _compat
    from memfit.remat.eager import costs as capture_module

    saved = dict(capture_module._RATES)
    try:
        capture_module._RATES.clear()
        with _compat.fake_tensor_mode():
            under_fake = capture_module._calibrate(torch.device("cpu"))
        capture_module._RATES.clear()
        real = capture_module._calibrate(torch.device("cpu"))
    finally:
        capture_module._RATES.clear()
        capture_module._RATES.update(saved)
    # the same machine, measured twice: within a factor of 8 (a shared CPU moves them 2-5x), where fake ops were
    # off by 20-300x (bandwidth alone moves too much between two measurements here to be compared)
    for name in ("flops_per_s", "op_overhead_s"):
        assert 1 / 8 < getattr(under_fake, name) / getattr(real, name) < 8, (name, under_fake, real)
