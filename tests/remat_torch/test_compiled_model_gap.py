"""memfit's own model of a compiled step against inductor's buffer plan of the code it generated.

``CompiledPlan.predicted_peak_bytes`` is memfit's model of the partitioned forward and backward graphs;
``compiled_peak_bytes`` is inductor's own plan for those graphs, read from its generated wrapper (the reference:
it matched process RSS within 0.5-4% on the test zoo's transformers). The fast case checks the layout rules on a
small convnet (inductor's channels-last copies of the forward's inputs, saved for the backward, and oneDNN's
scratch inside convolution calls); the slow cases run the zoo of ``benchmarks/remat_compiled_model_gap.py``.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import memfit.remat
from memfit.remat.compiled import fusion

ROOT = Path(__file__).resolve().parents[2]


def _wide_convnet() -> nn.Module:
    """Convolutions whose weights are as large as a small batch's activations (the copies matter)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1, bias=False),
        nn.BatchNorm2d(48),
        nn.ReLU(),
        nn.Conv2d(48, 96, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(96),
        nn.ReLU(),
        nn.Conv2d(96, 96, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, 10),
    )


def _plan(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], budget: float | int | None):
    torch._dynamo.reset()
    be = memfit.remat.backend(budget=budget, refine=False, rates=memfit.remat.Rates(2e10, 5e9, 5e-6))
    step = torch.compile(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), backend=be)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step(batch).backward()
    assert len(be.plans) == 1
    return be.plans[0]


def test_convnet_layout_copies_and_scratch_within_5pct_of_inductors_plan():
    """On CPU inductor with oneDNN, the forward copies every convolution weight (and the image batch) to
    channels-last and saves the copies for the backward, and each oneDNN convolution call holds buffers of its own:
    here they are most of the step's peak. memfit's model is within 5% of inductor's plan; without those two rules
    it is under it by more than a third."""
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 3, 12, 12, generator=g), torch.randint(0, 10, (2,), generator=g))
    plan = _plan(_wide_convnet(), batch, None)
    assert plan.compiled_peak_bytes is not None
    ratio = plan.predicted_peak_bytes / plan.compiled_peak_bytes
    assert abs(ratio - 1) < 0.05, (plan.predicted_peak_bytes, plan.compiled_peak_bytes)


class _GatheredExperts(nn.Module):
    """HF's ``batched_mm`` experts in miniature: each token's expert weight gathered (``w[ids]``, T x H x F), then a
    one-row bmm per token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(32, 32)
        self.w = nn.Parameter(torch.randn(4, 32, 64) / 8)
        self.proj = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(self.inp(x).unsqueeze(1), self.w[ids]).squeeze(1)
        return self.proj(torch.relu(h))


def test_gathered_weight_bmm_is_not_stored_as_in_inductors_plan():
    """A gathered per-token weight read by a one-row bmm, recomputed in the backward (least memory): inductor lowers
    the bmm to a multiply and a sum that loads the gather inline (``tuned_bmm``), so the 2 MiB gather is never
    stored, and memfit's model does not store it either (it used to: 9x inductor's plan on Mixtral's
    ``batched_mm`` experts). What remains between the two on this toy (the model 27% under) is one 64 KiB
    (256 x 64) buffer more in inductor's backward, not the gather."""
    model = _GatheredExperts()
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(256, 32, generator=g), torch.randint(0, 4, (256,), generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    torch._dynamo.reset()
    be = memfit.remat.backend(budget=1, refine=False, rates=memfit.remat.Rates(2e10, 5e9, 5e-6))
    step = torch.compile(lambda b: nn.functional.cross_entropy(model(b[0], b[1]), b[2]), backend=be)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # budget 1 byte: the least-memory plan, marked infeasible
        step((x, ids, y)).backward()
    (plan,) = be.plans
    assert plan.compiled_peak_bytes is not None
    gather = 256 * 32 * 64 * 4
    assert plan.compiled_peak_bytes < gather / 4  # inductor never stores the gather
    assert plan.predicted_peak_bytes < gather / 4  # nor does the model
    assert abs(plan.predicted_peak_bytes / plan.compiled_peak_bytes - 1) < 0.3


class _Scan(nn.Module):
    """A linear recurrence ``h_t = a_t h_(t-1) + b_t`` as a log-depth (Hillis-Steele) scan of concatenations, the
    form of HF Mamba's pure-PyTorch scan, on inputs that need no gradient (the step's peak is the forward's scan)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("wa", torch.randn(32, 64) / 6)
        self.register_buffer("wb", torch.randn(32, 64) / 6)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.sigmoid(x @ self.wa), x @ self.wb
        k = 1
        while k < a.shape[1]:
            a, b = (
                torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], 1),
                torch.cat([b[:, :k], b[:, k:] + a[:, k:] * b[:, :-k]], 1),
            )
            k *= 2
        return self.out(b).mean(1)


def test_scan_in_one_kernel_as_in_inductors_plan(monkeypatch):
    """inductor computes the whole scan (every level's concatenation, each read by the next) in one kernel, all its
    buffers allocated before it runs: memfit's model (fusion._kernels) matches inductor's plan within 5%; freeing
    each buffer as its last reader passes, as the model did, reads under half of it."""
    from memfit.remat.compiled import model

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 64, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
    plan = _plan(_Scan(), batch, None)
    assert plan.compiled_peak_bytes is not None
    assert abs(plan.predicted_peak_bytes / plan.compiled_peak_bytes - 1) < 0.05
    # the model without the rule: each value its own kernel
    monkeypatch.setattr(
        model, "_kernels", lambda items, inputs, stored, ends: {v: (items.index(v),) * 2 for v in stored}
    )
    apart = _plan(_Scan(), batch, None)
    assert apart.compiled_peak_bytes == plan.compiled_peak_bytes  # the same graphs for inductor
    assert apart.predicted_peak_bytes < 0.5 * plan.compiled_peak_bytes


def test_kernels_join_reads_within_a_stretch_between_extern_kernels():
    """fusion._kernels: values joined by reads between two matmuls are one kernel (through an inlined value); work
    that only shares an input, and work on the far side of a matmul, are kernels of their own."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        a = x.sin()  # stored (stand-in): joined with b through the inlined c
        c = a * 2
        b = c + 1
        d = x.cos()  # shares only the input x
        e = (b @ w).exp()  # after a matmul
        return b, d, e

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 4), torch.randn(4, 4))
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    by = {str(n.target).split(".")[1] if n.op == "call_function" else n.name: n for n in nodes}
    kinds = {n: fusion._kind(n) for n in nodes}
    stored = [by["sin"], by["add"], by["cos"], by["exp"], by["mm"]]
    k = fusion._kernels(
        nodes, lambda n: n.all_input_nodes, stored, lambda n: fusion._ends_stretch(n, kinds[n])
    )
    pos = {n: i for i, n in enumerate(nodes)}
    assert k[by["sin"]] == k[by["add"]] == (pos[by["sin"]], pos[by["add"]])
    assert k[by["cos"]] == (pos[by["cos"]],) * 2
    # a scatter is a kernel of its own (inductor lowers it to a mutation it does not fuse)
    scatter = make_fx(
        lambda v, i: torch.zeros(8, 4).index_put((i,), v.exp(), accumulate=True), tracing_mode="fake"
    )(torch.randn(3, 4), torch.tensor([0, 2, 2]))
    put = next(n for n in scatter.graph.nodes if n.target is torch.ops.aten.index_put.default)
    assert fusion._ends_stretch(put, fusion._kind(put))
    assert k[by["exp"]] == (pos[by["exp"]],) * 2
    assert k[by["mm"]] == (pos[by["mm"]],) * 2


def _graph_plans(f, *args, rule: str) -> tuple[int, int, int]:
    """``(inductor's plan, memfit's model, the model without ``rule``)`` of one graph's peak (its inputs count
    nothing); ``rule``: the function of :mod:`memfit.remat.compiled.model` to turn off."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch.fx.experimental.proxy_tensor import make_fx

    from memfit import _compat
    from memfit.remat.compiled import model

    gm = make_fx(f)(*args)
    with config.patch({"fx_graph_cache": False}):
        source = compile_fx_inner(make_fx(f)(*args), list(args)).source_code
    plan = _compat.inductor_wrapper_plan(
        source, {n.name: 0 for n in gm.graph.nodes if n.op == "placeholder"}, 4
    )
    assert plan is not None
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    kind = {n: fusion._kind(n) for n in nodes}
    outputs = set(gm.graph.output_node().args[0])
    peak, _ = model._run_peak(nodes, kind, fusion._owners(nodes, kind), outputs, {}, True)
    real = getattr(model, rule)
    try:
        setattr(model, rule, lambda *a, **k: [] if rule == "_gradient_sum_groups" else {})
        apart, _ = model._run_peak(nodes, kind, fusion._owners(nodes, kind), outputs, {}, True)
    finally:
        setattr(model, rule, real)
    return plan.peak, peak, apart


def test_inplace_reuse_within_a_kernel_as_in_inductors_plan():
    """fusion._inplace: a kernel's value that only the next value of the kernel reads, at the same index, gives it
    its buffer (inductor's decide_inplace_update). A sum of 16 inputs is stored (its expression loads more than
    realize_acc_reads_threshold buffers), read once by ``sin(b) * 2``: one 256 KiB buffer for both in inductor's
    plan and in the model; without the rule the model counts two. Returned, the sum keeps its buffer and the sine
    gets its own, in both (a partial sum of the first inputs still gives its buffer to the next, in both)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(256, 256, generator=g) for _ in range(16)] + [torch.randn(256, 16, generator=g)]

    def f(*xs):
        b = sum(xs[1:-1], xs[0])
        return ((b.sin() * 2) @ xs[-1],)

    planned, peak, apart = _graph_plans(f, *xs, rule="_inplace")
    assert peak == planned
    assert apart - planned > 0.9 * 256 * 256 * 4

    def returned(*xs):
        b = sum(xs[1:-1], xs[0])
        return ((b.sin() * 2) @ xs[-1], b)

    planned, peak, apart = _graph_plans(returned, *xs, rule="_inplace")
    assert peak == planned
    assert planned > 2 * 256 * 256 * 4  # the sum and the sine apart


def test_gradient_sums_run_together_as_in_inductors_plan():
    """Sums only the graph returns, over the same loops and sharing a read, are one kernel in inductor's plan, run
    after the last of them is ready: ``exp(3a)``, read only by the first two sums, lives through the matmuls until
    the third (fusion._gradient_sum_groups). The model matches the plan; without the rule it frees the 1 MiB
    early."""
    g = torch.Generator().manual_seed(0)
    x, a, grad = (torch.randn(4096, 64, generator=g) for _ in range(3))
    w, wt = torch.randn(64, 1024, generator=g), torch.randn(1024, 64, generator=g)

    def f(x, w, a, grad, wt):
        b = (x * 2).exp()
        e = (a * 3).exp()
        s1, s2 = (e * b).sum(0), e.sum(0)
        c = (b @ w) @ wt  # 16 MiB between the sums
        return s1, s2, (b * c * grad).sum(0)

    planned, peak, apart = _graph_plans(f, x, w, a, grad, wt, rule="_gradient_sum_groups")
    assert abs(peak / planned - 1) < 1e-3
    assert planned - apart > 0.9 * 2**20


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.frozensets(st.integers(0, 6), max_size=3)), min_size=1, max_size=12
    ),
    st.integers(1, 4),
)
def test_gradient_sum_groups_properties(sums, window):
    """fusion._gradient_sum_groups on random sums (loops, buffers read): groups keep the run order, share loops, and
    each member reads a buffer an earlier member of its group reads; a sum left alone shares no buffer with any
    group of its loops among the last ``window``; every sum is in at most one group."""
    items = list(range(len(sums)))
    groups = fusion._gradient_sum_groups(
        items, lambda i: set(sums[i][1]), lambda i: sums[i][0], window=window
    )
    grouped = [i for g in groups for i in g]
    assert len(grouped) == len(set(grouped))
    for g in groups:
        assert len(g) > 1 and g == sorted(g)
        assert len({sums[i][0] for i in g}) == 1
        for k, i in enumerate(g[1:], 1):
            assert set(sums[i][1]) & set().union(*(sums[j][1] for j in g[:k]))
    # a singleton: no earlier sum of its loops that shares a buffer with it is in a group it could have joined
    # (checked for the first sum of each loops: nothing before it to join)
    for i in items:
        earlier = [j for j in items[:i] if sums[j][0] == sums[i][0]]
        if not earlier:
            assert all(g[0] == i or i not in g for g in groups)


def test_reuse_counts_reads_through_views():
    """fusion._uses counts a value's reads as inductor's mark_reuse does: a view passes its own readers' count to the
    value it views (one permute read by three slices: three uses)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        e = x.exp().permute(1, 0)
        return e[:2] * e[2:4] + e[4:6]

    gm = make_fx(f, tracing_mode="fake")(torch.randn(3, 6))
    exp = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.exp.default)
    kinds = {n: fusion._kind(n) for n in gm.graph.nodes}
    assert len(exp.users) == 1
    assert fusion._uses(list(exp.users), lambda n: kinds.get(n, "other"), lambda n: list(n.users)) == 3


def test_layout_copies_follow_inductors_rule():
    """fusion._layout_copies restates inductor's rule on an fx graph: a 2-d convolution's graph inputs that are not
    channels-last already are copied (a 1x1 weight already is: no copy), none without a 2-d convolution."""
    from torch.fx.experimental.proxy_tensor import make_fx

    w3, w1, x = torch.randn(8, 4, 3, 3), torch.randn(8, 8, 1, 1), torch.randn(2, 4, 6, 6)

    def f(x, w3, w1):
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, w3, padding=1), w1)

    gm = make_fx(f, tracing_mode="fake")(x, w3, w1)
    copies = {n.name: b for n, b in fusion._layout_copies(gm.graph.nodes).items()}
    expected = {"x_1": x.numel() * 4, "w3_1": w3.numel() * 4} if torch.backends.mkldnn.is_available() else {}
    if torch.backends.mkldnn.is_available():
        assert copies == expected
    lin = make_fx(lambda a, b: a @ b, tracing_mode="fake")(torch.randn(4, 4), torch.randn(4, 4))
    assert fusion._layout_copies(lin.graph.nodes) == {}


sys.path.insert(0, str(ROOT / "benchmarks"))
ZOO = [
    "memfit_gpt",
    "gpt2",
    "bert",
    "llama",
    "t5",
    "resnet18",
    "vit",
    "gpt_neox",
    "mixtral_batched_mm",
    "mamba",
]
BUDGETS = ["none", "0.7", "0.5", "least"]
# Measured gaps the model does not close, as strict xfail (a fix turns them into failures to remove from here). None
# since the in-place and gradient-sum rules (docs/remat_compiled.md, "How close the model is to inductor's plan");
# the closest row is Mamba at 0.7, 1.097.
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _cases() -> list:
    return [
        pytest.param(name, b, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[(name, b)]))
        if (name, b) in KNOWN_GAPS
        else pytest.param(name, b)
        for name in ZOO
        for b in BUDGETS
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "budget"), _cases())
def test_zoo_model_within_10pct_of_inductors_plan(name: str, budget: str):
    """The benchmark's shapes (zoo "small" configs, 2 x 64 tokens, ResNet-18 on 8 64x64 images), CPU inductor, each
    compiled graph's plan: memfit's model within 10% of inductor's buffer plan of the same graphs."""
    import remat_compiled_model_gap as gap

    row = gap.measure(name, budget)
    assert row["plans"]
    for plan in row["plans"]:
        assert plan["compiled_peak_bytes"] is not None
        ratio = plan["predicted_peak_bytes"] / plan["compiled_peak_bytes"]
        assert abs(ratio - 1) <= 0.10, (
            name,
            budget,
            plan["predicted_peak_bytes"],
            plan["compiled_peak_bytes"],
        )
