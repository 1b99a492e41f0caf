"""memfit.plan: predictions made on meta tensors against real CPU steps measured with memfit.memory.track."""

import pytest
import torch

from memfit import remat
from memfit.memory import track
from memfit.models import PRESETS
from memfit.plan import OPTIMIZERS, estimate, make_optimizer, parse_bytes


def _measured_peak(spec, batch_size, seq_len, opt_name, budget):
    """Peak of a real training step on the CPU (second step: the optimizer state exists, as the plan assumes)."""
    torch.manual_seed(0)
    model = spec.build()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch_size, seq_len), generator=gen)
    batch = (x, torch.roll(x, -1, dims=1))
    step = remat.compile(model, spec.loss_fn, batch, budget=budget) if budget is not None else None
    opt = make_optimizer(opt_name, model.parameters())

    def train_step():
        if step is None:
            spec.loss_fn(model, batch).backward()
        else:
            step(batch)
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    with track(model, opt, inputs=batch) as t:
        train_step()
    return t.report


def _check(spec_name, batch_size, seq_len, optimizers, budgets):
    spec = PRESETS[spec_name]
    est = estimate(spec_name, batch_size, seq_len, optimizers=optimizers, remat=budgets)
    assert not est.notes
    rows = {(r.optimizer, r.remat): r for r in est.rows}
    assert set(rows) == {(o, b) for o in optimizers for b in budgets}
    for opt_name in optimizers:
        for budget in budgets:
            measured = _measured_peak(spec, batch_size, seq_len, opt_name, budget)
            row = rows[opt_name, budget]
            rel = abs(row.peak_bytes - measured.total_peak_bytes) / measured.total_peak_bytes
            assert rel < 0.10, (opt_name, budget, row.peak_bytes, measured.total_peak_bytes)
            # the state is counted exactly, whether stepped on meta or from the optimizer's formula
            assert row.breakdown["optimizer_state"] == measured.baseline_breakdown["optimizer_state"], (
                opt_name
            )


def test_predicted_peak_within_10_percent_of_measured_tiny():
    _check("tiny", 8, 64, tuple(OPTIMIZERS), (None,))
    _check("tiny", 8, 64, ("adam", "sm3"), (0.5,))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "batch", "seq"), [("tiny", 4, 64), ("tiny", 32, 64), ("small", 4, 128), ("small", 16, 64)]
)
def test_predicted_peak_within_10_percent_of_measured(name, batch, seq):
    _check(name, batch, seq, tuple(OPTIMIZERS), (None, 0.5))


def test_fits_and_max_batch_are_consistent_with_the_peaks():
    # limit at Adam's predicted peak: Adam (no remat) just fits, and a batch twice as large predicts more than it
    base = estimate("tiny", 4, 32, optimizers=("adam", "sm3"), remat=(None,))
    adam = next(r for r in base.rows if r.optimizer == "adam")
    est = estimate("tiny", 4, 32, memory=adam.peak_bytes, optimizers=("adam", "sm3"), remat=(None,))
    rows = {r.optimizer: r for r in est.rows}
    assert rows["adam"].fits and rows["sm3"].fits
    assert rows["adam"].max_batch >= 4 - 1  # linear extrapolation, rounded down
    assert rows["sm3"].max_batch >= rows["adam"].max_batch  # less state, more room
    big = estimate(
        "tiny",
        4 * (rows["sm3"].max_batch + 4),
        32,
        optimizers=("sm3",),
        remat=(None,),
        memory=adam.peak_bytes,
    )
    assert not big.rows[0].fits


def test_parse_bytes_and_errors():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    assert parse_bytes(123) == 123
    for bad in ("lots", "24 XiB", "0GiB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="unknown optimizer"):
        estimate("tiny", 2, 8, optimizers=("lion",))
    with pytest.raises(ValueError, match="remat budget"):
        estimate("tiny", 2, 8, remat=(1.5,))


@pytest.mark.slow
def test_gpt2_xl_plan_allocates_nothing_and_finishes_in_a_minute():
    import resource
    import subprocess
    import sys
    import time

    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memfit.cli",
            "plan",
            "--model",
            "gpt2-xl",
            "--batch",
            "8x1024",
            "--memory",
            "24GiB",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    assert rss < 2 * 2**30, rss  # 1.5e9 float32 parameters alone would be 5.8 GiB
    assert seconds < 60, seconds
    import json

    data = json.loads(out.stdout)
    assert data["n_params"] == 1_557_611_200
    adam = next(r for r in data["rows"] if r["optimizer"] == "adam" and r["remat"] is None)
    assert adam["breakdown"]["parameters"] == 4 * 1_557_611_200
    assert adam["breakdown"]["optimizer_state"] >= 2 * 4 * 1_557_611_200
