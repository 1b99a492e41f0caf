"""``memfit demo`` end to end at a small size: the report's structure, and the claims it exists to show."""

import itertools
import json
import math

import pytest

from memfit.cli import main
from memfit.demo import DemoConfig, build_optimizer
from memfit.memory import CATEGORIES
from memfit.plan import estimate

STEPS, BATCH, SEQ = 6, 4, 32


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status = main(
        [
            "demo",
            "--steps",
            str(STEPS),
            "--batch-size",
            str(BATCH),
            "--seq-len",
            str(SEQ),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert status == 0
    return out


@pytest.fixture(scope="module")
def report(demo_out):
    return json.loads((demo_out / "report.json").read_text())


def test_demo_writes_report_and_png(demo_out, report):
    png = (demo_out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a real figure, not an empty canvas
    names = [r["name"] for r in report["results"]]
    assert names[:2] == ["Adam", "SM3"] and names[2].startswith("SM3 + remat ") and names[3] == "Adafactor"
    assert names[4] == "SM3 + momentum (bf16)" and "(equal memory)" in names[5] and len(names) == 6
    assert report["machine"]["torch"] and report["machine"]["cpu_count"] >= 1
    for r in report["results"]:
        assert set(r["breakdown"]) == set(CATEGORIES)
        assert sum(r["breakdown"].values()) == r["peak_bytes"]
        assert len(r["losses"]) == r["steps"] and all(math.isfinite(x) for x in r["losses"])
        assert r["val_curve"][-1][0] == r["steps"]
        assert r["tokens"] == r["steps"] * r["batch_size"] * SEQ
        assert r["tokens_per_second"] == pytest.approx(r["batch_size"] * SEQ / r["step_seconds"])
        pts = r["val_points"]
        assert [p["step"] for p in pts] == [s for s, _ in r["val_curve"]]
        assert all(p["tokens"] == p["step"] * r["batch_size"] * SEQ for p in pts)
        # training seconds so far: the sum of the step times, so it grows with the steps and ends at the total
        assert all(a["seconds"] < b["seconds"] for a, b in itertools.pairwise(pts))
        assert pts[-1]["seconds"] == pytest.approx(r["train_seconds"])
    assert all(r["steps"] == STEPS and r["batch_size"] == BATCH for r in report["results"][:5])


def test_demo_claims_hold(report):
    adam, sm3, remat, adafactor, sm3_mom, _ = report["results"]
    # SM3's state: one accumulator per row and column (independently: the sizes of the preset's tensors)
    assert sm3["optimizer_state_bytes"] < 0.01 * adam["optimizer_state_bytes"]
    n_params = report["n_params"]
    assert adam["optimizer_state_bytes"] >= 2 * 4 * n_params  # exp_avg + exp_avg_sq (+ step counters)
    # momentum in bfloat16 adds exactly 2 bytes per parameter to SM3's accumulators: a quarter of Adam's 8
    assert sm3_mom["optimizer_state_bytes"] - sm3["optimizer_state_bytes"] == 2 * n_params
    assert 0.24 < sm3_mom["optimizer_state_bytes"] / adam["optimizer_state_bytes"] < 0.30
    assert remat["peak_bytes"] < min(adam["peak_bytes"], sm3["peak_bytes"], adafactor["peak_bytes"])
    plan = remat["remat_plan"]
    assert plan["peak_bytes"] <= plan["budget_bytes"] < plan["noremat_peak_bytes"]
    # same data, same initial weights, same optimizer: remat changes the memory, not the arithmetic
    assert remat["losses"] == pytest.approx(sm3["losses"], rel=1e-4)
    assert report["ratios"]["Adam"] == {
        "peak": 1.0,
        "optimizer_state": 1.0,
        "step_time": 1.0,
        "tokens_per_second": 1.0,
        "val_loss": 1.0,
    }


def test_equal_memory_run_is_the_planners_largest_batch(report):
    adam, *_, eq_run = report["results"]
    eq = report["equal_memory"]
    assert eq_run["equal_memory"] == {
        k: v for k, v in eq.items() if k not in ("adam_measured_peak_bytes", "name")
    }
    # the limit is the planner's Adam peak at the demo's batch, and the planner predicted it within 10%
    limit = estimate("mini", BATCH, SEQ, optimizers=("adam",), remat=(None,)).rows[0].peak_bytes
    assert eq["limit_bytes"] == limit
    assert eq["adam_measured_peak_bytes"] == adam["peak_bytes"]
    assert abs(limit - adam["peak_bytes"]) <= 0.1 * adam["peak_bytes"]
    # the chosen batch: larger than the demo's, predicted to fit, and the next one predicted not to
    b, budget = eq["batch_size"], eq["remat_budget"]
    assert eq_run["batch_size"] == b > BATCH and eq_run["remat_budget"] == budget
    assert eq_run["planned_peak_bytes"] == eq["predicted_peak_bytes"] <= limit
    above = estimate("mini", b + 1, SEQ, optimizers=("sm3",), remat=(budget,)).rows
    assert not above or above[0].peak_bytes > limit
    # prediction vs measurement: a gap over 10% is a bug in the planner or the demo
    assert abs(eq_run["planned_peak_bytes"] - eq_run["peak_bytes"]) <= 0.1 * eq_run["peak_bytes"]
    assert eq_run["peak_bytes"] <= 1.1 * adam["peak_bytes"]
    # the same tokens as every other run, up to one of its batches
    assert abs(eq_run["tokens"] - adam["tokens"]) <= b * SEQ / 2
    assert (
        eq_run["optimizer_kind"] == "sm3"
        and eq_run["optimizer_state_bytes"] < 0.01 * adam["optimizer_state_bytes"]
    )


def test_build_optimizer_kinds():
    import torch

    p = torch.nn.Parameter(torch.zeros(3, 5))
    p.grad = torch.ones(3, 5)
    opt = build_optimizer("sm3-bf16", [p], 0.1)
    opt.step()
    # momentum 0.9 in a bfloat16 buffer, as the table says
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    assert build_optimizer("sm3", [p], 0.1).param_groups[0]["momentum"] == 0.0
    with pytest.raises(
        ValueError, match="unknown demo optimizer 'lion'; known: adam, sm3, sm3-bf16, adafactor"
    ):
        build_optimizer("lion", [p], 0.1)


@pytest.mark.parametrize("field", ["sm3_momentum_lr", "equal_memory_lr", "warmup_steps"])
def test_config_rejects_non_positive(field):
    with pytest.raises(ValueError, match=f"DemoConfig.{field} must be"):
        DemoConfig(**{field: 0})
