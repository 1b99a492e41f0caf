"""What does an optimizer step cost, in state bytes and time, on a GPT-2-small-sized model (124M params)?

Baseline: ``torch.optim.Adam(fused=True)`` (one fused kernel per parameter, PyTorch's fastest Adam).
Compared: Adam foreach, Adagrad, Adafactor (all ``torch.optim``), memfit's SM3 (momentum 0 / 0.9 /
0.9 in bf16), CountSketchAdam, and the public SM3 ports on PyPI when installed:

    .venv/bin/pip install --no-deps pytorch-optimizer torch-sm3   # benchmark-only, not runtime deps

Method: every optimizer owns its own state but all of them update the *same* parameter tensors with the
*same* gradients (lr = 1e-7, so the parameters barely move): the memory is parameters + gradients + the
sum of the states, which keeps the full run near 5 GiB. One warm-up step each (state allocation, kernel
compilation), then ``--repeats`` rounds in which each optimizer steps once, in an order rotated every
round (the machine is shared and noisy); the table shows medians and ratios to fused Adam.

Run: ``.venv/bin/python benchmarks/optim_step.py`` (``--quick`` for a 2-layer, small-vocab smoke run).
Writes ``benchmarks/results/optim_step.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import track as progress
from torch import Tensor

from memfit.optim import SM3, CountSketchAdam

RESULTS = Path(__file__).resolve().parent / "results" / "optim_step.json"
INSTALL = ".venv/bin/pip install --no-deps pytorch-optimizer torch-sm3"


def gpt2_shapes(
    n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_ctx: int = 1024
) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (HF layout, tied LM head): 124.4M parameters at the defaults."""
    shapes: list[tuple[int, ...]] = [(vocab, n_embd), (n_ctx, n_embd)]
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,)]  # ln_1
        shapes += [(n_embd, 3 * n_embd), (3 * n_embd,)]  # attn.c_attn
        shapes += [(n_embd, n_embd), (n_embd,)]  # attn.c_proj
        shapes += [(n_embd,), (n_embd,)]  # ln_2
        shapes += [(n_embd, 4 * n_embd), (4 * n_embd,)]  # mlp.c_fc
        shapes += [(4 * n_embd, n_embd), (n_embd,)]  # mlp.c_proj
    shapes += [(n_embd,), (n_embd,)]  # ln_f
    return shapes


def _ports() -> dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]]:
    """The public SM3 ports, if installed (skipped with a printed note otherwise)."""
    out: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {}
    try:
        po = importlib.import_module("pytorch_optimizer")
        out["pytorch_optimizer.SM3 (mom 0)"] = lambda ps: po.SM3(ps, lr=1e-7, momentum=0.0)
        out["pytorch_optimizer.SM3 (mom 0.9)"] = lambda ps: po.SM3(ps, lr=1e-7, momentum=0.9)
    except ImportError:
        print(f"note: pytorch_optimizer not installed, skipped ({INSTALL})")
    try:
        ts = importlib.import_module("SM3")  # the torch-SM3 distribution installs a top-level `SM3`
        out["torch-SM3 (mom 0)"] = lambda ps: ts.SM3(ps, lr=1e-7, momentum=0.0)
        out["torch-SM3 (mom 0.9)"] = lambda ps: ts.SM3(ps, lr=1e-7, momentum=0.9)
    except ImportError:
        print(f"note: torch-SM3 not installed, skipped ({INSTALL})")
    return out


def optimizers(include_ports: bool = True) -> dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]]:
    """Name -> factory over a parameter list; the first entry is the baseline."""
    lr = 1e-7
    table: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
        "Adam fused (baseline)": lambda ps: torch.optim.Adam(ps, lr=lr, fused=True),
        "Adam foreach": lambda ps: torch.optim.Adam(ps, lr=lr, foreach=True),
        "Adagrad foreach": lambda ps: torch.optim.Adagrad(ps, lr=lr, foreach=True),
        "Adafactor foreach": lambda ps: torch.optim.Adafactor(ps, lr=lr, foreach=True),
        "SM3 mom 0 (fused)": lambda ps: SM3(ps, lr=lr, momentum=0.0),
        "SM3 mom 0.9 (fused)": lambda ps: SM3(ps, lr=lr, momentum=0.9),
        "SM3 mom 0.9 bf16 (fused)": lambda ps: SM3(ps, lr=lr, momentum=0.9, momentum_dtype=torch.bfloat16),
        "SM3 mom 0.9 (foreach)": lambda ps: SM3(ps, lr=lr, momentum=0.9, foreach=True),
        # The default nonfinite="raise" checks max |g| once per step; "propagate" checks nothing.
        "SM3 mom 0 (fused, nonfinite=propagate)": lambda ps: SM3(
            ps, lr=lr, momentum=0.0, nonfinite="propagate"
        ),
        "SM3 mom 0.9 (fused, nonfinite=propagate)": lambda ps: SM3(
            ps, lr=lr, momentum=0.9, nonfinite="propagate"
        ),
        "CountSketchAdam": lambda ps: CountSketchAdam(ps, lr=lr),
    }
    if include_ports:
        table.update(_ports())
    return table


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (step counters included)."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            values = value if isinstance(value, list | tuple) else [value]
            total += sum(v.numel() * v.element_size() for v in values if isinstance(v, Tensor))
    return total


def run(
    shapes: list[tuple[int, ...]], repeats: int, include_ports: bool = True, only: str | None = None
) -> dict[str, Any]:
    """Time each optimizer's step on ``shapes``; returns raw numbers (seconds, bytes) per optimizer.

    ``only``: keep the baseline and the optimizers whose name contains this string.
    """
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).mul_(0.02).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    factories = optimizers(include_ports)
    if only:
        base = next(iter(factories))
        factories = {k: v for k, v in factories.items() if k == base or only in k}
    opts = {name: make(params) for name, make in factories.items()}
    for opt in progress(opts.values(), description="warm-up (state, kernels)", transient=True):
        opt.step()  # allocate state, compile kernels
    times: dict[str, list[float]] = {name: [] for name in opts}
    names = list(opts)
    for r in progress(range(repeats), description="timed rounds", transient=True):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in params)
    base = names[0]
    rows = {}
    for name in names:
        med = statistics.median(times[name])
        rows[name] = {
            "median_s": med,
            "times_s": times[name],
            "state_bytes": state_bytes(opts[name]),
            "time_ratio": med / statistics.median(times[base]),
            "state_ratio": state_bytes(opts[name]) / state_bytes(opts[base]),
        }
    return {
        "n_params": n_params,
        "n_tensors": len(params),
        "repeats": repeats,
        "baseline": base,
        "rows": rows,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Optimizer step on {result['n_params'] / 1e6:.1f}M params ({result['n_tensors']} tensors), "
        f"median of {result['repeats']}, ratios to {result['baseline']}"
    )
    for col in ("optimizer", "state MiB", "state / Adam", "step ms", "time / Adam"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    for name, row in result["rows"].items():
        table.add_row(
            name,
            f"{row['state_bytes'] / 2**20:.2f}",
            f"{row['state_ratio']:.4f}",
            f"{row['median_s'] * 1e3:.1f}",
            f"{row['time_ratio']:.2f}x",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 layers, 8k vocab, 5 repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15, quick 5)")
    parser.add_argument("--no-ports", action="store_true", help="skip the public SM3 ports")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--only", default=None, help="keep the baseline and the rows whose name contains this"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = gpt2_shapes(n_layer=2, vocab=8192, n_ctx=256) if args.quick else gpt2_shapes()
    repeats = args.repeats or (5 if args.quick else 15)
    result = run(shapes, repeats, include_ports=not args.no_ports, only=args.only)
    result.update(
        {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "processor": _cpu_model(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "quick": args.quick,
        }
    )
    _print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()
