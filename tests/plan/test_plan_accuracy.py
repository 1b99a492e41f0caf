"""``memfit.plan.estimate`` for any model against real CPU steps: peaks, the largest batch that fits, a sample of
``benchmarks/plan_accuracy.py``'s grid."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from memfit.memory import track
from memfit.models import get_model
from memfit.plan import estimate, make_optimizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "remat_torch"))

import plan_user_model  # noqa: E402
import zoo  # noqa: E402


def _real_peak(model, loss_fn, batch, optimizer):
    """Tracker peak of the second real training step (the optimizer state exists, as the plan assumes)."""
    opt = make_optimizer(optimizer, model.parameters())

    def step():
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with track(model, opt, inputs=batch) as t:
        step()
    return t.report.total_peak_bytes


def _gpt(b):
    spec = get_model("tiny")
    x = torch.randint(0, 256, (b, 32), generator=torch.Generator().manual_seed(b))
    return spec.build(), spec.loss_fn, (x, torch.roll(x, -1, 1))


def _tagger(b):
    ex = plan_user_model.make_batch()
    return plan_user_model.make_model(), plan_user_model.loss, {k: v[:1].repeat(b, 1) for k, v in ex.items()}


def _resnet(b):
    g = torch.Generator().manual_seed(b)
    model = zoo.ResNet18(width=4, num_classes=10)
    return model, zoo.xent, (torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g))


@pytest.mark.parametrize(
    ("build", "optimizer"),
    [(_gpt, "adam"), (_tagger, "sm3"), (_resnet, "sm3-m0.9")],
    ids=["gpt", "tagger", "resnet"],
)
def test_predicted_max_batch_is_the_largest_that_fits_when_measured(build, optimizer):
    torch.manual_seed(0)
    # measure real steps at increasing batch sizes (from 2: BatchNorm needs two values per channel); the limit
    # lies between the peaks of batch 5 and 6
    peaks = {b: _real_peak(*build(b), optimizer) for b in range(2, 9)}
    limit = (peaks[5] + peaks[6]) // 2
    found = 0
    for b in range(2, 9):  # the search a user would do: grow the batch until a step no longer fits
        if peaks[b] > limit:
            break
        found = b
    model, loss_fn, batch = build(2)
    est = estimate(model, loss_fn, batch, memory=limit, optimizers=(optimizer,), remat=(None,), timing=False)
    row = est.rows[0]
    assert abs(row.max_batch - found) <= 1, (row.max_batch, found, peaks, limit)
    # and the plan's peak at the planned batch is the measured one
    assert abs(row.peak_bytes / peaks[2] - 1) < 0.03, (row.peak_bytes, peaks[2])


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast", "fp16-autocast"])
def test_precisions_match_a_real_step(precision):
    torch.manual_seed(0)
    model, loss_fn, batch = _tagger(4)
    est = estimate(
        model, loss_fn, batch, optimizers=("adam", "sm3"), remat=(None,), precision=precision, timing=False
    )
    for row in est.rows:
        torch.manual_seed(0)
        model, loss_fn, batch = _tagger(4)
        dtype = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(precision)
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        opt = make_optimizer(row.optimizer, model.parameters())
        scaler = torch.amp.GradScaler("cpu") if precision == "fp16-autocast" else None

        def step(model=model, loss_fn=loss_fn, batch=batch, opt=opt, scaler=scaler, dtype=dtype):
            if dtype is None:
                loss = loss_fn(model, batch)
            else:
                with torch.autocast("cpu", dtype=dtype):
                    loss = loss_fn(model, batch)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad(set_to_none=True)

        step()
        with track(model, opt, inputs=batch) as t:
            step()
        measured = t.report.total_peak_bytes
        assert abs(row.peak_bytes / measured - 1) < 0.03, (precision, row.optimizer, row.peak_bytes, measured)
        assert row.breakdown["optimizer_state"] == t.report.baseline_breakdown["optimizer_state"]


def _bench():
    spec = importlib.util.spec_from_file_location("plan_accuracy", ROOT / "benchmarks" / "plan_accuracy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plan_accuracy"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["tagger/b4/adam/remat-0.5/fp32", "gpt/b8/sm3/remat-0.5/fp32", "bert/b4/adam/remat-none/fp32"]
)
def test_benchmark_sample_within_5_percent(name):
    bench = _bench()
    cfg = next(c for c in bench.GRID if c.name == name)
    row = bench.measure(cfg, steps=1)
    assert abs(row["error"]) <= 0.05, row
