"""SM3 under data parallelism on 2 gloo processes: DDP, ZeroRedundancyOptimizer, and remat steps in DDP.

The ranks' work is in ``_workers_data_parallel.py``; these tests compare what each rank returned against
single-process runs made here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _workers_data_parallel import CS_HYPER, HYPER, STEPS, _mlp

from memfit.optim import SM3, CountSketchAdam

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def results(dist_results):
    """Per rank, what ``_workers_data_parallel.run`` returned."""
    return [r["data_parallel"] for r in dist_results[0]]


def test_ddp_reduced_gradient_is_the_average_bitwise(results):
    for s in range(STEPS):
        avg = [
            (a + b) / 2
            for a, b in zip(results[0]["local_grads"][s], results[1]["local_grads"][s], strict=True)
        ]
        for r in range(2):
            for got, want in zip(results[r]["ddp_grads"][s], avg, strict=True):
                np.testing.assert_array_equal(got, want)
        # The ranks' own gradients differ, so a test that skipped the reduction would fail.
        assert any(
            not np.array_equal(a, b)
            for a, b in zip(results[0]["local_grads"][s], results[1]["local_grads"][s], strict=True)
        )


@pytest.mark.parametrize(
    ("prefix", "make_opt"),
    [("", lambda ps: SM3(ps, **HYPER)), ("cs_", lambda ps: CountSketchAdam(ps, **CS_HYPER))],
    ids=["SM3", "CountSketchAdam"],
)
def test_ddp_optimizer_equals_single_process_fed_averaged_grads_bitwise(results, prefix, make_opt):
    model = _mlp(0)
    opt = make_opt(model.parameters())
    for s in range(STEPS):
        for p, a, b in zip(
            model.parameters(), results[0][prefix + "local_grads"][s], results[1][prefix + "local_grads"][s],
            strict=True,
        ):  # fmt: skip
            p.grad = torch.from_numpy((a + b) / 2)
        opt.step()
    for r in range(2):
        for got, p in zip(results[r][prefix + "ddp_params"], model.parameters(), strict=True):
            np.testing.assert_array_equal(got, p.detach().numpy())
        assert not np.array_equal(results[r][prefix + "ddp_params"][0], _mlp(0)[0].weight.detach().numpy())


def test_zero_consolidated_state_loads_into_single_process_sm3(results):
    r0 = results[0]
    n_params = len(list(_mlp(1).parameters()))
    # Every parameter's state was gathered, whichever rank owned it, after STEPS steps.
    assert r0["zero_state_steps"] == [float(STEPS)] * n_params
    assert results[0]["zero_owned"][0] + results[1]["zero_owned"][0] == n_params
    assert min(results[0]["zero_owned"][0], results[1]["zero_owned"][0]) > 0  # both ranks own some state
    assert all("accumulator_0" in k or "accumulator" in k for k in r0["zero_state_keys"])
    assert np.all(r0["zero_loaded_acc"][0] > 0)  # real accumulated state, not a fresh zero state
    # The single-process SM3 continues exactly as the sharded one.
    assert r0["zero_continue_diffs"] == [0.0, 0.0]


def test_remat_step_in_data_parallel_matches_ddp(results):
    for r in range(2):
        assert results[r]["remat_calls_returned"] == 1 == results[r]["remat_calls_counted"]  # one bucket
        for got, want in zip(results[r]["remat_grads"], results[r]["ddp_ref_grads"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # Before the reduction the ranks' gradients differ; after it they agree bitwise.
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(results[0]["remat_local_grads"], results[1]["remat_local_grads"], strict=True)
    )
    for a, b in zip(results[0]["remat_grads"], results[1]["remat_grads"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_all_reduce_grads_bucketing_does_not_change_the_result(results):
    n_params = len(results[0]["remat_grads"])
    for r in range(2):
        assert results[r]["per_tensor_calls"] == n_params  # bucket_bytes=1: one all-reduce per gradient
        for a, b in zip(results[r]["per_tensor_grads"], results[r]["remat_grads"], strict=True):
            np.testing.assert_array_equal(a, b)


def test_all_reduce_grads_errors_are_actionable():
    from memfit.distributed import all_reduce_grads

    model = _mlp(0)
    with pytest.raises(ValueError, match="bucket_bytes must be > 0, got 0"):
        all_reduce_grads(model, bucket_bytes=0)
    if not torch.distributed.is_initialized():  # this pytest process never joins a process group
        with pytest.raises(RuntimeError, match="init_process_group"):
            all_reduce_grads(model)


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_ddp_example_trains_the_demo_model_on_two_ranks():
    """examples/ddp_demo.py under torchrun: 2 gloo ranks train the demo GPT with SM3, and end with the same model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "ddp_demo.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    out = subprocess.run(
        [*cmd, "--steps", "6", "--batch-size", "4", "--seq-len", "32"],
        capture_output=True, text=True, timeout=220, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )  # fmt: skip
    # the head of stderr holds the failing rank's own message; torchrun's summary follows it
    assert out.returncode == 0, f"stdout:\n{out.stdout[-2000:]}\nstderr:\n{out.stderr[:3000]}"
    assert "parameters identical on every rank" in out.stdout
    losses = [float(line.split()[3]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert losses and all(loss == loss and loss < 6.0 for loss in losses)  # finite, from ln(256) = 5.5 down
