"""What does SM3 cost under FSDP2, in communication and time, next to Adam? (2 gloo processes on CPU.)

Each rank trains the same model (a stack of ``depth`` ``d x d`` Linear layers, float32) wrapped in FSDP2
``fully_shard``, with SM3 and with ``torch.optim.Adam`` (foreach), alternating the two every repetition so
that machine noise hits both. Measured per step, median over repetitions: forward + backward time, optimizer
step time, and the bytes SM3 all-reduces (counted by wrapping ``torch.distributed.all_reduce``), against the
bytes FSDP2 itself moves for the parameters (2 all-gathers + 1 reduce-scatter of every parameter).

Run: ``.venv/bin/python benchmarks/distributed_sm3.py [--quick]``; raw numbers go to
``benchmarks/results/distributed_sm3.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(d: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(d, d), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def _worker(rank: int, port: int, d: int, depth: int, reps: int, out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from memfit.optim import SM3

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    mesh = init_device_mesh("cpu", (WORLD,))
    runs = {}
    for name in ("sm3", "adam"):
        model = _model(d, depth)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if name == "sm3":
            opt: torch.optim.Optimizer = SM3(model.parameters(), lr=0.01, momentum=0.9, fused=False)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
        runs[name] = (model, opt)
    real = dist.all_reduce
    counted = {"bytes": 0, "calls": 0}

    def counting(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        counted["bytes"] += tensor.numel() * tensor.element_size()
        counted["calls"] += 1
        return real(tensor, *args, **kwargs)

    times: dict[str, dict[str, list[float]]] = {n: {"fwd_bwd": [], "opt": []} for n in runs}
    comm: dict[str, list[int]] = {n: [] for n in runs}
    x = torch.randn(32, d, generator=torch.Generator().manual_seed(rank))
    for rep in range(reps + 1):  # repetition 0 warms up
        for name, (model, opt) in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            t1 = time.perf_counter()
            counted.update(bytes=0, calls=0)
            dist.all_reduce = counting
            try:
                opt.step()
            finally:
                dist.all_reduce = real
            t2 = time.perf_counter()
            opt.zero_grad()
            if rep > 0:
                times[name]["fwd_bwd"].append(t1 - t0)
                times[name]["opt"].append(t2 - t1)
                comm[name].append(counted["bytes"])
                comm[name + "_calls"] = [counted["calls"]]
    param_bytes = sum(p.numel() * p.element_size() for p in runs["sm3"][0].parameters())
    if rank == 0:
        Path(out_path).write_text(json.dumps({"times": times, "comm": comm, "param_bytes": param_bytes}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, few repetitions")
    args = ap.parse_args()
    d, depth, reps = (256, 4, 5) if args.quick else (1024, 8, 15)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        mp.spawn(_worker, args=(_free_port(), d, depth, reps, out), nprocs=WORLD, join=True)
        raw = json.loads(Path(out).read_text())
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in raw["times"].items()}
    fsdp_bytes = 3 * raw["param_bytes"]  # all-gather (fwd) + all-gather (bwd) + reduce-scatter, full size
    table = Table(
        title=f"FSDP2 on {WORLD} gloo ranks, {depth} x Linear({d}, {d}) fp32, batch 32 (median of {reps})"
    )
    for col in ("optimizer", "fwd+bwd ms", "opt.step ms", "step / Adam step", "opt all-reduce B/step", "calls",
                "vs FSDP2 param traffic"):  # fmt: skip
        table.add_column(col, justify="right")
    for n in ("adam", "sm3"):
        b = statistics.median(raw["comm"][n])
        table.add_row(
            n,
            f"{1e3 * med[n]['fwd_bwd']:.2f}",
            f"{1e3 * med[n]['opt']:.2f}",
            f"{med[n]['opt'] / med['adam']['opt']:.2f}",
            f"{b:,.0f}",
            str(raw["comm"][n + "_calls"][0]),
            f"{b / fsdp_bytes:.2e}",
        )
    Console(width=130).print(table)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "config": {"world": WORLD, "d": d, "depth": depth, "reps": reps, "quick": args.quick},
        "fsdp_param_traffic_bytes": fsdp_bytes,
        **raw,
        "median_s": med,
    }
    name = "distributed_sm3_quick.json" if args.quick else "distributed_sm3.json"
    path = Path(__file__).parent / "results" / name
    path.write_text(json.dumps(result, indent=1))
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
