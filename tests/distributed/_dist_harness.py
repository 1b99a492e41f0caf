"""Run a worker function on 2 gloo processes on CPU (127.0.0.1 only) and collect what each rank returns.

Process start-up (importing torch in each child) dominates these tests, so each test module spawns once:
its worker runs every check and returns plain data (numpy arrays, floats, strings) that the tests assert on.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker: Callable[..., Any], rank: int, world: int, port: int, out: Any, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    except BaseException:
        out.put((rank, "init-error", traceback.format_exc()))
        return
    try:
        result = worker(rank, world, *args)
        out.put((rank, "ok", result))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            # free the worker's DDP objects (reference cycles holding the process group) before the group goes,
            # not during interpreter shutdown, where gloo's threads can abort the process
            gc.collect()
            dist.destroy_process_group()


class _RendezvousFailed(RuntimeError):
    """Every failing rank failed in ``init_process_group`` (a port or connection race, not a test result)."""


def run_spawned(worker: Callable[..., Any], *args: Any, world: int = 2, timeout: float = 120.0) -> list[Any]:
    """``[worker(0, world, *args), worker(1, world, *args), ..]``, each run in its own spawned process.

    A failed rendezvous (the free port taken in between, a dropped loopback connection on a busy machine) is
    retried once on a new port; a failure inside ``worker`` never is.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message) or did not answer within ``timeout``.
    """
    try:
        return _run_once(worker, args, world, timeout)
    except _RendezvousFailed:
        return _run_once(worker, args, world, timeout)


def _run_once(worker: Callable[..., Any], args: tuple, world: int, timeout: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world, port, out, args)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"distributed workers timed out after {timeout}s; got ranks {sorted(results)}"
                )
            try:
                rank, status, value = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and out.empty():
                    codes = [p.exitcode for p in procs]
                    raise RuntimeError(f"a worker died without reporting (exit codes {codes})") from None
                continue
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank} ({status}):\n{value}")
                break  # the other ranks may be stuck in a collective: stop them below
        if errors:
            # Give the other ranks a moment to report their own failure (often the first cause).
            end = time.monotonic() + 3.0
            while len(results) + len(errors) < world and time.monotonic() < end:
                try:
                    rank, status, value = out.get(timeout=0.5)
                except queue.Empty:
                    continue
                if status != "ok":
                    errors.append(f"rank {rank} ({status}):\n{value}")
            if all("(init-error)" in e for e in errors):
                raise _RendezvousFailed("\n".join(errors))
            raise RuntimeError("\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


def run_all(rank: int, world: int, ckpt_dir: str) -> dict:
    """Every distributed check of the test session, on one rank. It lives here, not in conftest.py: the spawned
    processes unpickle it by module name, and several test folders have a module called ``conftest``."""
    import _workers_data_parallel
    import _workers_fsdp

    return {
        "data_parallel": _workers_data_parallel.run(rank, world),
        "fsdp": _workers_fsdp.run(rank, world, ckpt_dir),
    }
