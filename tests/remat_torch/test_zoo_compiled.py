"""The model zoo (``zoo.py``) on the compiled path: ``torch.compile(..., backend=memfit.remat.backend(budget=0.5))``
on CPU inductor, each model as a user writes it (attention masks with padding, tied embeddings, dropout where the
config has it, BatchNorm in train mode), nothing edited for memfit (issue 13, item 5, compiled side).

Every model of the zoo (its ``"small"`` sizes): BERT, Llama, T5, ViT, GPT-NeoX, Mixtral with HF's ``grouped_mm``
experts (the default; on CPU transformers' ``grouped_mm_fallback`` op) and with ``batched_mm``, Mamba and ResNet-18.
In a child process (``_compiled_rss.py``: one thread, glibc's mmap threshold at 64 KiB, and before each of 5
measured steps ``malloc_trim(0)`` and ``--plug``), per model:

- the first compiled step's loss and gradients at budget 0.5 equal eager autograd's from the same state (dropout
  set to 0 for this comparison, ``nn.Dropout`` and the attention rates HF keeps as floats: inductor draws its masks
  from its own generator, not eager's), and buffers (BatchNorm running statistics, ``num_batches_tracked``) are
  updated exactly once, to eager's values;
- inductor's buffer plan of the step (``CompiledPlan.compiled_peak_bytes``, read from the code inductor generated)
  is within 5% of the step's measured peak RSS (the median of the 5 steps), with dropout as the model has it, at
  torch's own partition (``budget=None``) and at 0.5;
- the budget lowers the measured peak, and a plan is marked feasible exactly when inductor's plan fits the budget.

Run of 2026-12-03 05:27-05:46 UTC (2-core x86_64 CPU, torch 2.13.0+cpu, other work running beside it; ``pytest -m
slow -s``: 35 passed in 1116 s; T5's gradient case failed there on its attention dropout, a float the comparison
did not set to 0, and passed after the fix: T5's 4 cases in 203 s at 05:49-05:52, the figures below). Inductor's
plan against the measured peak (MiB), torch's partition / 0.5, and whether 0.5's plan fits the budget:

    BERT              29.86 vs 29.87 (-0.0%) / 14.03 vs 13.95 (+0.5%)       feasible
    Llama             22.05 vs 22.17 (-0.5%) / 14.41 vs 14.50 (-0.6%)       infeasible (least memory above 0.5)
    T5                44.10 vs 44.72 (-1.4%) / 24.53 vs 25.26 (-2.9%)       infeasible
    ViT               70.12 vs 70.14 (-0.0%) / 32.89 vs 33.02 (-0.4%)       feasible
    GPT-NeoX          19.04 vs 19.14 (-0.5%) /  9.67 vs  9.69 (-0.2%)       feasible
    Mixtral grouped   40.46 vs 40.62 (-0.4%) / 29.87 vs 30.11 (-0.8%)       infeasible
    Mixtral batched 3110.15 vs 3110.18 (-0.0%) / 1079.41 vs 1079.55 (-0.0%) feasible
    Mamba             40.39 vs 40.69 (-0.7%) / 23.48 vs 23.43 (+0.2%)       infeasible
    ResNet-18         90.94 vs 91.02 (-0.1%) / 60.43 vs 60.94 (-0.8%)       infeasible

The 5 steps of one process agreed within 0.1 MiB (T5: 0.12 at torch's partition, 0.19 at 0.5). Where 0.5 is
infeasible the budget still lowers the measured peak (Mixtral grouped by 26%, ResNet-18 33%, Llama 35%, Mamba 42%,
T5 44%): the backend builds its least-memory plan and marks it infeasible. The rest of T5's gap (0.6-0.7 MiB below
RSS) was not traced.
ViT recompiles once (HF sets ``config.problem_type`` on its first call): the same graph, the same plan.

How the measurement was made steady. ``malloc_trim`` returns free heap pages, but the free chunks stay in glibc's
lists, and a tensor of the mmap threshold or more is served from such a hole before a new mapping: RSS rises when
it is written and does not fall when it is freed (``_compiled_rss.py heap-holes``: a freed 1 MiB tensor lowered RSS
by 0 bytes). Llama at 0.5 read -4.0% and -4.7% in two processes (same plan, 14.41 MiB; steps of one process from
14.49 to 15.12 MiB); GPT-NeoX at 0.5 -11.6%; BERT at 0.5 had read -6.9% in an earlier run. ``--plug`` takes those
holes out of reach for the step (``malloc`` of every free chunk of 64 KiB or more, pages untouched): Llama -0.9%,
steps within 0.04 MiB. Without ``malloc_trim`` the step reused free heap pages that earlier steps left resident, and
RSS read up to 6 MB below what the step allocated (BERT at 0.5: 11.3 MiB measured against a plan of 14.3).

Two misses of the wrapper's replay (``memfit._compat.inductor_wrapper_plan``) were found on these models and fixed
(fast tests below): a fallback kernel's tuple result holds every item until the tuple is deleted (the flash-attention
backward's three gradients, 0.8 MiB on GPT-NeoX); and a buffer bound to a second name (``bufM = bufN`` for
transformers' ``grouped_mm_fallback`` output, ``# alias`` views) was missed or freed at its first ``del``
(Mixtral ``grouped_mm`` at 0.5: plan 25.87 against 30.11 MiB, -14.1%, before the fix).

Each model compiles two or three times (10-400 s each on the 2-core CPU; Mamba and T5 take 6-10 min): ``slow``. The
fast tests check the replay on the forms these graphs take and the ``--plug`` measurement itself.
"""

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from .zoo import BUILDERS, no_dropout

HERE = Path(__file__).resolve().parent
BUDGET = 0.5
STEPS = 5  # measured steps per budget; the measured peak is their median

# (model, budget) pairs where inductor's plan is known to miss the measured peak by more than 5%, with the figure
# and the cause measured (strict: the case fails once the replay or the model is fixed, and the mark must go)
MISSES: dict[tuple[str, str], str] = {}


def _child(name: str, budgets: list[str], *flags: str) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(HERE / "_compiled_rss.py"), f"zoo:{name}", "inductor", *budgets, *flags],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(budgets), out.stderr[-3000:]
    return rows


def _rates(m: torch.nn.Module) -> list[float]:
    """A module's dropout rates: an ``nn.Dropout``'s ``p``, or the float attention dropout rate of a HF module
    (T5's ``T5Attention.dropout``, ViT's and GPT-NeoX's ``attention_dropout``); ``_compiled_rss.py --no-dropout``
    sets the same ones to 0."""
    rates = [m.p] if isinstance(m, torch.nn.Dropout) else []
    return rates + [
        v for a in ("dropout", "attention_dropout") if isinstance(v := getattr(m, a, None), float)
    ]


def _has_dropout(name: str) -> bool:
    model, _, _ = BUILDERS[name]("tiny")
    return any(r > 0 for m in model.modules() for r in _rates(m))


@functools.cache
def _run(name: str) -> tuple[dict, list[dict]]:
    """One model's children, run once for the tests below: the first compiled step's loss, gradients and buffers
    at the budget (dropout off), and the rows of torch's partition and the budget (dropout as the model has it)."""
    flags = ("--trim", "1", "--plug", "1", "--steps", str(STEPS), "--peak", "median")
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "step.pt"
        if _has_dropout(name):  # gradients with dropout off; the memory as the user runs it, dropout on
            _child(name, [str(BUDGET)], "--no-dropout", "--save", str(saved), *flags)
            rows = _child(name, ["none", str(BUDGET)], *flags)
        else:  # one child: --save writes the last budget's first step
            rows = _child(name, ["none", str(BUDGET)], "--save", str(saved), *flags)
        got = torch.load(saved)
    return got, rows


def _eager(name: str) -> tuple[torch.Tensor, dict, dict]:
    """Eager autograd's loss, gradients and buffers after one step, dropout off, generator seeded as the child."""
    model, loss_fn, batch = BUILDERS[name]("small")
    model.train()
    no_dropout(model)
    assert not any(r > 0 for m in model.modules() for r in _rates(m)), name
    torch.manual_seed(7)
    loss = loss_fn(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, dict(model.named_buffers())


def _plan(row: dict, name: str) -> dict:
    """The row's plan: one graph per step (a recompile of the same graph repeats its plan)."""
    plans = row["plans"]
    key = ("budget_bytes", "predicted_peak_bytes", "compiled_peak_bytes")
    assert plans and all([p[k] for k in key] == [plans[0][k] for k in key] for p in plans), (name, plans)
    return plans[-1]


def _gap(row: dict, name: str) -> float:
    """inductor's plan over the measured peak, less 1."""
    plan = _plan(row, name)
    compiled, measured = plan["compiled_peak_bytes"], row["measured"]
    assert compiled is not None, name
    steps = ", ".join(f"{m / 2**20:.2f}" for m in row["measured_steps"])
    print(f"{name} budget {row['budget']}: inductor's plan {compiled / 2**20:.2f} MiB, measured "
          f"{measured / 2**20:.2f} MiB (median of {steps}) ({compiled / measured - 1:+.1%}), "
          f"feasible {plan['feasible']}")  # fmt: skip
    return compiled / measured - 1


MODELS = list(BUILDERS)  # every model of the zoo, Mixtral with both expert implementations


@pytest.mark.slow
@pytest.mark.timeout(
    3600
)  # the first test of a model runs its children (Mamba, T5: 10 min on a loaded 2-core CPU)
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_gradients_and_buffers_on_the_compiled_path(name):
    got, _ = _run(name)
    ref_loss, ref_grads, ref_buffers = _eager(name)
    torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-4, atol=1e-5, msg=name)
    assert got["grads"].keys() == ref_grads.keys(), name
    for n, g in got["grads"].items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-3, atol=1e-4, msg=f"{name} {n}")
    assert got["buffers"].keys() == ref_buffers.keys(), name
    for n, b in got["buffers"].items():
        torch.testing.assert_close(b, ref_buffers[n], msg=f"{name} buffer {n}")  # updated once, as eager
    if name == "resnet18":
        counts = [b for n, b in got["buffers"].items() if n.endswith("num_batches_tracked")]
        assert counts and all(int(c) == 1 for c in counts), name


def _cases() -> list:
    out = []
    for name in MODELS:
        for budget in ("none", str(BUDGET)):
            miss = MISSES.get((name, budget))
            marks = [pytest.mark.xfail(strict=True, reason=miss)] if miss else []
            out.append(pytest.param(name, budget, marks=marks, id=f"{name}-{budget}"))
    return out


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize(("name", "budget"), _cases())
def test_zoo_model_inductor_plan_within_5_percent_of_rss(name, budget):
    """Inductor's plan within 5% of the measured peak (RSS after glibc's malloc_trim, so that the step cannot reuse
    free heap pages left resident by earlier steps; the median of the steps' peaks), at torch's partition and at
    the budget, dropout as the model has it."""
    _, (full, half) = _run(name)
    assert abs(_gap(full if budget == "none" else half, name)) <= 0.05, name


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_budget_lowers_the_measured_peak(name):
    _, (full, half) = _run(name)
    assert half["measured"] < full["measured"], name
    plan = _plan(half, name)
    # feasible exactly when inductor's plan fits the budget (an infeasible plan says so, and is kept only when
    # no compile reached the budget)
    assert plan["feasible"] == (plan["compiled_peak_bytes"] <= plan["budget_bytes"]), (name, plan)
    assert plan["compiled_peak_bytes"] < _plan(full, name)["compiled_peak_bytes"], name


# the forward of a convolution under CPU inductor's layout optimisation (torch 2.13's codegen, trimmed): the weight
# and the batch are copied to channels-last, the convolution is an extern kernel, and the forward returns the weight's
# copy (buf0) in the weight's place as a saved value, a view of its own buffer, and the batch (an input) itself
_INDUCTOR_FORWARD = """
    def call(self, args):
        primals_1, primals_2 = args
        args.clear()
        assert_size_stride(primals_1, (16, 8, 3, 3), (72, 9, 3, 1), 'input')
        buf0 = empty_strided_cpu((16, 8, 3, 3), (72, 1, 24, 8), torch.float32)
        assert_size_stride(primals_2, (2, 8, 8, 8), (512, 64, 8, 1), 'input')
        buf1 = empty_strided_cpu((2, 8, 8, 8), (512, 1, 64, 8), torch.float32)
        cpp_fused_0(primals_1, primals_2, buf0, buf1)
        del primals_1
        # Topologically Sorted Source Nodes: [conv2d]
        buf2 = extern_kernels.convolution(buf1, buf0, stride=(1, 1), padding=(1, 1), dilation=(1, 1), transposed=False, output_padding=(0, 0), groups=1, bias=None)
        assert_size_stride(buf2, (2, 16, 8, 8), (1024, 1, 128, 16), 'torch.ops.aten.convolution.default')
        del buf1
        buf3 = empty_strided_cpu((2, 16, 8, 8), (1024, 1, 128, 16), torch.float32)
        cpp_fused_relu_1(buf2, buf3)
        return (reinterpret_tensor(buf3, (2048, ), (1, ), 0), buf0, primals_2, buf2, None, )
"""


def test_inductor_wrapper_plan_counts_layout_copies_and_onednn_scratch():
    from memfit import _compat

    weight, batch, out = 16 * 8 * 3 * 3 * 4, 2 * 8 * 8 * 8 * 4, 2 * 16 * 8 * 8 * 4
    args = {"primals_1": 0, "primals_2": 0}  # parameters and the batch exist before the step
    plain = _compat.inductor_wrapper_plan(_INDUCTOR_FORWARD, args)
    assert plain is not None
    # the two copies and the convolution's output; then the input's copy is freed and the relu's output allocated
    assert plain.peak == max(weight + batch + out, weight + 2 * out)
    # returned: the relu's output (a view of buf3), the weight's copy, the batch itself (0), the conv output, None
    assert plain.returned == (out, weight, 0, out, 0)
    scratch = _compat.inductor_wrapper_plan(_INDUCTOR_FORWARD, args, onednn_scratch=True)
    assert scratch is not None
    # inside the convolution's call: its output and oneDNN's copy of the weight (channels-last input)
    assert scratch.peak == weight + batch + out + weight
    assert _compat.inductor_wrapper_peak(_INDUCTOR_FORWARD, args) == plain.peak


def _measure(mode: str, timeout: int) -> str:
    """The child's standard output for one of its measurement modes (``conv-scratch``, ``heap-holes``)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(HERE / "_compiled_rss.py"), mode],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_onednn_scratch_rule_against_measured_convolutions():
    """The rule ``inductor_wrapper_plan(onednn_scratch=True)`` restates, against the peak RSS of single oneDNN
    convolution calls (``_compiled_rss.py conv-scratch``, 3x3 convolutions of 128-512 channels, batch 16): beyond
    its outputs, a forward call holds the weight (plus the output when the input is not channels-last), a backward
    call twice the weight with channels-last inputs (the weight plus the output gradient otherwise)."""
    rows = [json.loads(line) for line in _measure("conv-scratch", 300).splitlines() if line.startswith("{")]
    assert len(rows) == 8
    for r in rows:
        w, o = r["weight_bytes"], r["out_bytes"]
        fwd, bwd = r["fwd_peak"] - r["fwd_outputs"], r["bwd_peak"] - r["bwd_outputs"]
        if (
            w < 2**20
        ):  # 128 channels: page rounding and oneDNN's own small buffers dominate; the rule is a floor
            continue
        if r["channels_last"]:  # inductor's layout optimisation: what the CPU path runs by default
            assert abs(fwd - w) <= 0.1 * w, r
            assert abs(bwd - 2 * w) <= 0.1 * 2 * w, r
        else:
            assert abs(fwd - (w + o)) <= 0.2 * (w + o), r
            assert abs(bwd - (w + o)) <= 0.2 * (w + o), r


# the backward of an attention as CPU inductor (torch 2.13) generated it for GPT-NeoX (trimmed): a fallback kernel
# returns a tuple of three gradients; the wrapper names each item, uses it, and deletes the name, but the tuple
# (buf0) keeps all three alive until ``del buf0``
_ATTENTION_BACKWARD = """
    def call(self, args):
        q, k, v, out, lse, grad_out = args
        args.clear()
        buf0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(grad_out, q, k, v, out, lse, 0.0, True, scale=0.17677669529663687)
        del grad_out
        buf1 = buf0[0]
        assert_size_stride(buf1, (4, 4, 128, 32), (16384, 32, 128, 1), 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        buf4 = empty_strided_cpu((4, 4, 128, 96), (49152, 12288, 96, 1), torch.float32)
        cpp_fused_0(buf1, buf4)
        del buf1
        buf2 = buf0[1]
        assert_size_stride(buf2, (4, 4, 128, 32), (16384, 32, 128, 1), 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        cpp_fused_1(buf2, buf4)
        del buf2
        buf3 = buf0[2]
        assert_size_stride(buf3, (4, 4, 128, 32), (16384, 32, 128, 1), 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        buf5 = empty_strided_cpu((512, 384), (384, 1), torch.float32)
        cpp_fused_2(buf3, buf4, buf5)
        del buf0
        del q, k
        return (buf5, buf4, buf3, )
"""


def test_inductor_wrapper_plan_holds_tuple_items_until_the_tuple_is_deleted():
    from memfit import _compat

    g = 4 * 4 * 128 * 32 * 4  # one gradient of q, k or v
    args = {"q": g, "k": g, "v": g, "out": g, "lse": 4 * 4 * 128 * 4, "grad_out": g}
    plan = _compat.inductor_wrapper_plan(_ATTENTION_BACKWARD, args)
    assert plan is not None
    # at buf5: the inputs less grad_out, all three gradients (the tuple holds buf1 and buf2 after their del), buf4
    # (3 g) and buf5 (512 x 384 floats, 3 g)
    assert plan.peak == sum(args.values()) - g + 3 * g + 3 * g + 3 * g
    # returned: buf5, buf4 and buf3 (an item of a tuple deleted before the return: it owns its bytes)
    assert plan.returned == (3 * g, 3 * g, g)


def test_plugged_heap_holes_let_rss_follow_a_freed_tensor():
    """The measurement the slow tests rely on (``_compiled_rss.py --plug``): with a free hole in glibc's heap (small
    tensors freed below a live one, pages returned by ``malloc_trim``), a 1 MiB tensor is served from the hole and
    freeing it returns nothing to the OS; with the holes plugged it is mapped anew, and freeing it lowers RSS by
    its size (page rounding aside)."""
    drops = json.loads(_measure("heap-holes", 120).splitlines()[-1])
    assert drops["plain"] < 2**18, drops  # the artefact: the freed tensor stays resident
    assert 2**20 <= drops["plugged"] <= 2**20 + 2 * 4096, drops


# Mixtral's experts with HF's default grouped_mm on CPU inductor (torch 2.13, trimmed): transformers' custom op
# returns a tensor the wrapper binds to a second name (``buf39 = buf38``) and checks under that name; a view of a
# buffer under a second name (``# alias``) keeps it alive after the first name's ``del``
_GROUPED_MM_FORWARD = """
    def call(self, args):
        x, w, offs = args
        args.clear()
        buf38 = torch.ops.transformers.grouped_mm_fallback.default(x, reinterpret_tensor(w, (4, 128, 1024), (131072, 1, 128), 0), offs)
        buf39 = buf38
        assert_size_stride(buf39, (1024, 1024), (1024, 1), 'torch.ops.transformers.grouped_mm_fallback.default')
        del buf38
        buf40 = empty_strided_cpu((1024, 512), (512, 1), torch.float32)
        buf41 = reinterpret_tensor(buf40, (1024, 256), (512, 1), 0)  # alias
        cpp_fused_0(buf39, buf40)
        del buf39
        del buf40
        buf42 = empty_strided_cpu((1024, 128), (128, 1), torch.float32)
        cpp_fused_1(buf41, buf42)
        del buf41
        return (buf42, )
"""


def test_inductor_wrapper_plan_follows_second_names_of_a_buffer():
    from memfit import _compat

    args = {"x": 1024 * 128 * 4, "w": 0, "offs": 16}
    plan = _compat.inductor_wrapper_plan(_GROUPED_MM_FORWARD, args)
    assert plan is not None
    out, gated, down = 1024 * 1024 * 4, 1024 * 512 * 4, 1024 * 128 * 4
    # the custom op's output (4 MiB, checked as buf39) with buf40; then buf39 freed, buf40 kept by its alias buf41
    # while buf42 is allocated
    assert plan.peak == sum(args.values()) + max(out + gated, gated + down)
    assert plan.returned == (down,)
