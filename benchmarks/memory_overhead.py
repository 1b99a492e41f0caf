"""How much slower is a training step under ``memfit.memory.track()``? (target: at most 3x)

For each workload (a small transformer encoder with AdamW, an MLP with Adam, and a tiny transformer whose
ops take microseconds, the worst case for a per-op hook) one training step
(zero_grad, forward, backward, optimizer step) is timed untracked, tracked by memfit (report building
included), and, as a reference point, tracked by torch's own ``MemTracker``. The four configurations are
interleaved in a rotating order within every repetition so that machine noise hits them alike; the table
shows median step times and, as the overhead figure, the median over repetitions of the ratio of a tracked
step to the untracked step run next to it (steadier than a ratio of medians when the load drifts).

Usage: .venv/bin/python benchmarks/memory_overhead.py [--quick]
Writes: benchmarks/results/memory_overhead.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from memfit._compat import TorchDispatchMode, mem_tracker_class
from memfit.memory import format_bytes, track

RESULTS = Path(__file__).parent / "results" / "memory_overhead.json"


def _transformer(
    d: int, layers: int, batch: int, seq: int, label: str
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor], str]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Linear(d, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, seq, d)
    y = torch.randint(0, 512, (batch, seq))

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    return model, opt, loss, f"{label} transformer d={d} L={layers} B={batch} T={seq}, AdamW"


def transformer_workload() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor], str]:
    return _transformer(256, 2, 8, 128, "small")


def tiny_transformer_workload() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor], str]:
    # Worst case: ops of a few microseconds, so the per-op Python cost of the dispatch mode dominates.
    return _transformer(32, 2, 2, 16, "tiny")


def mlp_workload() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor], str]:
    torch.manual_seed(0)
    widths = [512, 2048, 2048, 512]
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        mods += [nn.Linear(a, b), nn.GELU()]
    model = nn.Sequential(*mods[:-1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(256, widths[0])
    target = torch.randn(256, widths[-1])

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), target)

    return model, opt, loss, f"MLP {'-'.join(map(str, widths))} B=256, Adam"


class _EmptyMode(TorchDispatchMode):
    """The floor for any dispatch-mode tracker: a mode that only forwards each op."""

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return func(*args, **(kwargs or {}))


def _step(opt: torch.optim.Optimizer, loss: Callable[[], torch.Tensor]) -> None:
    opt.zero_grad(set_to_none=True)
    loss().backward()
    opt.step()


def measure(workload: Callable, reps: int, warmup: int) -> dict:
    model, opt, loss, name = workload()
    MemTracker = mem_tracker_class()
    info: dict = {}

    def untracked() -> None:
        _step(opt, loss)

    def memfit_tracked() -> None:
        with track(model, opt) as t:
            _step(opt, loss)
        info["peak"] = t.report.total_peak_bytes
        info["n_ops"] = t.report.n_ops

    def torch_memtracker() -> None:
        mt = MemTracker()
        mt.track_external(model, opt)
        with mt:
            _step(opt, loss)

    def empty_mode() -> None:
        with _EmptyMode():
            _step(opt, loss)

    configs = {
        "untracked": untracked,
        "empty dispatch mode": empty_mode,
        "memfit.track": memfit_tracked,
        "torch MemTracker": torch_memtracker,
    }
    samples: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    for _ in range(warmup):
        for k in names:
            configs[k]()
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
        for k in order:
            c0, t0 = time.process_time(), time.perf_counter()
            configs[k]()
            samples[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in samples.items()}

    def paired(data: dict[str, list[float]]) -> dict[str, float]:
        # On a shared machine the load drifts over seconds: the ratio of two steps run back to back in
        # the same repetition is steadier than the ratio of two medians.
        return {
            k: statistics.median(a / b for a, b in zip(data[k], data["untracked"], strict=True)) for k in data
        }

    return {
        "workload": name,
        "median_s": med,
        "ratio_vs_untracked": paired(samples),
        "cpu_ratio_vs_untracked": paired(cpu),
        "ratio_of_medians": {k: med[k] / med["untracked"] for k in med},
        "min_s": {k: min(v) for k, v in samples.items()},
        "samples_s": samples,
        "cpu_samples_s": cpu,
        "tracked_peak_bytes": info["peak"],
        "aten_ops_per_step": info["n_ops"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)"
    )
    args = parser.parse_args()
    reps, warmup = (5, 1) if args.quick else (31, 2)
    torch.set_num_threads(args.threads)

    results = [
        measure(w, reps, warmup) for w in (transformer_workload, mlp_workload, tiny_transformer_workload)
    ]

    table = Table(
        title=f"memfit.memory.track() overhead, {reps} interleaved repetitions (target ≤ 3x)",
        caption="step time: median wall clock; ratio: median over repetitions of (tracked / untracked) run back"
        " to back; CPU time: the same ratio of process CPU time, insensitive to other processes' load",
    )
    columns = (
        "workload",
        "ops/step",
        "tracked peak",
        "untracked",
        "empty dispatch mode",
        "memfit.track",
        "memfit.track (CPU time)",
    )
    for col in (*columns, "torch MemTracker"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in results:
        med, ratio = r["median_s"], r["ratio_vs_untracked"]
        table.add_row(
            r["workload"],
            str(r["aten_ops_per_step"]),
            format_bytes(r["tracked_peak_bytes"]),
            f"{1e3 * med['untracked']:.1f} ms",
            f"{1e3 * med['empty dispatch mode']:.1f} ms ({ratio['empty dispatch mode']:.2f}x)",
            f"{1e3 * med['memfit.track']:.1f} ms ({ratio['memfit.track']:.2f}x)",
            f"{r['cpu_ratio_vs_untracked']['memfit.track']:.2f}x",
            f"{1e3 * med['torch MemTracker']:.1f} ms ({ratio['torch MemTracker']:.2f}x)",
        )
    Console(width=160).print(table)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "memory_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "reps": reps,
        "results": results,
    }
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
