"""SM3 under FSDP2 (``fully_shard``, DTensor parameters, uneven shards) and DCP checkpoints, on 2 gloo processes.

The ranks' work is in ``_workers_fsdp.py``: each rank trains a sharded model and an unsharded copy (a plain
SM3 fed the same full gradients: the single-process run), checkpoints, reloads and exports.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _workers_fsdp import CONFIGS, STEPS, _net

from memfit.optim import SM3

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def results(dist_results):
    """Per rank, what ``_workers_fsdp.run`` returned."""
    return [r["fsdp"] for r in dist_results[0]]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fsdp2_sm3_uneven_shards_bitwise_equal_single_process(results, config):
    for r in range(2):
        res = results[r]["configs"][config]
        for got, want in zip(res["params"], res["ref_params"], strict=True):
            np.testing.assert_array_equal(got, want)
        assert res["acc_diffs"] and max(res["acc_diffs"]) == 0.0
    # The parameters moved (the comparison is not between two untouched copies).
    assert not np.array_equal(
        results[0]["configs"][config]["params"][0], _net(0).lin1.weight.detach().numpy()
    )


def test_fsdp2_state_placements_and_one_all_reduce_per_sharded_param(results):
    res = results[0]["configs"]["II+momentum"]
    assert res["not_dtensor"] == []  # never a rank-local plain tensor
    assert all(v == ["Shard(dim=0)"] for v in res["param_placements"].values())  # FSDP2's layout
    pl = res["placements"]
    for fqn in ("lin1.weight", "lin2.weight", "row"):
        assert pl[f"{fqn}.accumulator_0"] == ["Shard(dim=0)"]  # rows: local
        assert pl[f"{fqn}.accumulator_1"] == ["Replicate()"]  # columns: max-reduced
        assert pl[f"{fqn}.momentum_buffer"] == ["Shard(dim=0)"]
    assert [pl[f"cube.accumulator_{k}"] for k in range(3)] == [
        ["Shard(dim=0)"],
        ["Replicate()"],
        ["Replicate()"],
    ]
    for fqn in ("lin1.bias", "lin2.bias"):
        assert pl[f"{fqn}.accumulator"] == ["Shard(dim=0)"]
    # Rank >= 2 parameters: lin1.weight, lin2.weight, row, cube -> 4 all-reduces per step, biases none.
    for config in CONFIGS:
        for r in range(2):
            assert results[r]["configs"][config]["all_reduces_per_step"] == [4] * STEPS


def test_dcp_round_trip_restores_each_ranks_own_state(results):
    for r in range(2):
        res = results[r]
        assert res["dcp_keys_match"]
        assert max(res["dcp_state_diffs"].values()) == 0.0
        assert res["dcp_steps"] == [float(STEPS)] * 6
        assert max(res["dcp_continue_diffs"]) == 0.0
    # The ranks' states differ (17 vs 16 rows, other values): loading rank 0's state everywhere would fail.
    a0, a1 = results[0]["dcp_local_acc0"], results[1]["dcp_local_acc0"]
    assert a0.shape != a1.shape or not np.array_equal(a0, a1)


def test_dcp_plain_tensor_trap_is_real(results):
    # Why state must be DTensors: DCP deduplicates plain tensors, so rank 1 gets rank 0's value back.
    np.testing.assert_array_equal(results[1]["plain_trap_value"], np.full(3, 1.0))


def test_full_state_dict_export_continues_identically_in_one_process(results, dist_results):
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    res, ckpt = results[0], dist_results[1]
    full = torch.load(ckpt / "full.pt", weights_only=False)
    model = _net(5)
    model.load_state_dict(full["model"])
    opt = SM3(model.parameters(), fused=False, **CONFIGS["II+momentum"])
    set_optimizer_state_dict(model, opt, full["optim"])  # FQN-keyed full state, no process group
    # The exported state is the single-process reference's state, bitwise.
    for fqn, p in model.named_parameters():
        want = res["export_ref_state"][fqn]
        assert sorted(opt.state[p]) == sorted(want)
        for k, v in opt.state[p].items():
            np.testing.assert_array_equal(v.numpy(), want[k], err_msg=f"{fqn}.{k}")
    for grads in res["export_grads"]:
        for fqn, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[fqn])
        opt.step()
    for fqn, p in model.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), res["export_params"][fqn])


def test_unsupported_placement_is_refused_with_its_name(results):
    for r in range(2):
        msg = results[r]["partial_error"]
        assert "Partial" in msg and "supported placements are Shard(dim) and Replicate()" in msg
