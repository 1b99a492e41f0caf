"""One spawn of 2 gloo processes for the whole ``tests/distributed`` session (process start-up is the cost)."""

from __future__ import annotations

import pytest
from _dist_harness import run_spawned


def _run_all(rank: int, world: int, ckpt_dir: str) -> dict:
    import _workers_data_parallel
    import _workers_fsdp

    return {
        "data_parallel": _workers_data_parallel.run(rank, world),
        "fsdp": _workers_fsdp.run(rank, world, ckpt_dir),
    }


@pytest.fixture(scope="session")
def dist_results(tmp_path_factory):
    """``([rank 0's results, rank 1's results], checkpoint directory)``."""
    ckpt = tmp_path_factory.mktemp("dcp")
    return run_spawned(_run_all, str(ckpt), timeout=200), ckpt
