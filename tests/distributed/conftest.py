"""One spawn of 2 gloo processes for the whole ``tests/distributed`` session (process start-up is the cost)."""

from __future__ import annotations

import pytest
from _dist_harness import run_all, run_spawned


@pytest.fixture(scope="session")
def dist_results(tmp_path_factory):
    """``([rank 0's results, rank 1's results], checkpoint directory)``."""
    ckpt = tmp_path_factory.mktemp("dcp")
    return run_spawned(run_all, str(ckpt), timeout=200), ckpt
