"""Smoke test of benchmarks/optim_step.py's core function on a tiny GPT-2-shaped parameter set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def test_benchmark_core_runs_and_reports_consistent_ratios():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "optim_step.py"
    spec = importlib.util.spec_from_file_location("optim_step_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["optim_step_bench"] = bench
    spec.loader.exec_module(bench)
    shapes = bench.gpt2_shapes(n_layer=1, n_embd=16, vocab=50, n_ctx=8)
    expected_params = (
        50 * 16
        + 8 * 16
        + (2 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 2 * 16 + 16 * 64 + 64 + 64 * 16 + 16)
        + 2 * 16
    )
    result = bench.run(shapes, repeats=2, include_ports=False)
    assert result["n_params"] == expected_params
    rows = result["rows"]
    assert rows[result["baseline"]]["time_ratio"] == 1.0
    # SM3 without momentum: accumulators (sum of dims, or numel for vectors) + 4-byte step per tensor.
    sm3_bytes = sum(4 * (sum(s) if len(s) >= 2 else s[0]) + 4 for s in shapes)
    assert rows["SM3 mom 0 (fused)"]["state_bytes"] == sm3_bytes
    adam_bytes = sum(2 * 4 * (s[0] * (s[1] if len(s) > 1 else 1)) + 4 for s in shapes)
    assert rows[result["baseline"]]["state_bytes"] == adam_bytes
