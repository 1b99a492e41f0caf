"""``memfit demo`` end to end at a small size: the report's structure, and the claims it exists to show."""

import json
import math

import pytest

from memfit.cli import main
from memfit.memory import CATEGORIES


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status = main(
        ["demo", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--out", str(out), "--quiet"]
    )
    assert status == 0
    return out


def test_demo_writes_report_and_png(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    png = (demo_out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a real figure, not an empty canvas
    names = [r["name"] for r in report["results"]]
    assert names[:2] == ["Adam", "SM3"] and names[2].startswith("SM3 + remat ") and names[3] == "Adafactor"
    assert report["machine"]["torch"] and report["machine"]["cpu_count"] >= 1
    for r in report["results"]:
        assert set(r["breakdown"]) == set(CATEGORIES)
        assert sum(r["breakdown"].values()) == r["peak_bytes"]
        assert len(r["losses"]) == 6 and all(math.isfinite(x) for x in r["losses"])
        assert r["val_curve"][-1][0] == 6
        assert r["tokens_per_second"] == pytest.approx(4 * 32 / r["step_seconds"])


def test_demo_claims_hold(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    adam, sm3, remat, adafactor = (report["results"][i] for i in range(4))
    # SM3's state: one accumulator per row and column (independently: the sizes of the preset's tensors)
    assert sm3["optimizer_state_bytes"] < 0.01 * adam["optimizer_state_bytes"]
    n_params = report["n_params"]
    assert adam["optimizer_state_bytes"] >= 2 * 4 * n_params  # exp_avg + exp_avg_sq (+ step counters)
    assert remat["peak_bytes"] < min(adam["peak_bytes"], sm3["peak_bytes"], adafactor["peak_bytes"])
    plan = remat["remat_plan"]
    assert plan["peak_bytes"] <= plan["budget_bytes"] < plan["noremat_peak_bytes"]
    # same data, same initial weights, same optimizer: remat changes the memory, not the arithmetic
    assert remat["losses"] == pytest.approx(sm3["losses"], rel=1e-4)
    assert report["ratios"]["Adam"] == {
        "peak": 1.0,
        "optimizer_state": 1.0,
        "step_time": 1.0,
        "val_loss": 1.0,
    }
