"""Cold compile time of the compiled path (issue 19): ``torch.compile`` against ``memfit.remat.backend``.

The model and batch of ``remat_compiled.py`` (HF GPT-2 6x512, vocab 8192, batch 8x256, float32; ``--quick``: 2x128,
4x64). Each configuration compiles in a process of its own from an empty inductor cache, with inductor's kernel
compiles in that process (``TORCHINDUCTOR_COMPILE_THREADS=1``), so that its CPU time (its own and its compilers')
is the cost of the compile whatever else runs on the machine. Compile = the first call (compile + one step) minus
the median of the next steps, as in ``remat_compiled.py``'s column; solve = the CPU time memfit's partitioner
spends in ``choose.partition`` (each compile, the refining one included). Every memfit process prices
recomputation with one set of device speeds measured by the parent, so that they compile the same plans.

    python benchmarks/remat_compile_time.py                  # GPT-2 6x512, memfit at budget 0.5
    python benchmarks/remat_compile_time.py --budgets 0.5,0.3 --quick

Writes ``benchmarks/results/remat_compile_time[_quick].json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _table
from remat_sweep import build, fresh_function

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (inductor's C++ compiler runs)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def worker(kind: str, budget: float, quick: bool, rates: dict[str, float]) -> dict[str, Any]:
    import memfit.remat
    from memfit.remat.compiled import choose

    torch.set_num_threads(1)
    solve: list[float] = []
    real = choose.partition

    def timed(*args: Any, **kwargs: Any) -> Any:
        c0 = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            solve.append(time.process_time() - c0)

    choose.partition = timed  # type: ignore[assignment]
    model, loss_fn, batch, desc = build("gpt2", quick)

    def step(b: Any) -> torch.Tensor:
        return loss_fn(model, b)

    be = None
    if kind == "torch.compile":
        compiled = torch.compile(fresh_function(step, "torch_compile"))
    else:
        be = memfit.remat.backend(budget=budget, rates=memfit.remat.Rates(**rates))
        compiled = torch.compile(fresh_function(step, "memfit"), backend=be)
    t0, c0 = time.perf_counter(), _cpu_s()
    compiled(batch).backward()
    first, first_cpu = time.perf_counter() - t0, _cpu_s() - c0
    steps = []
    for _ in range(2):
        for p in model.parameters():
            p.grad = None
        t = time.perf_counter()
        compiled(batch).backward()
        steps.append(time.perf_counter() - t)
    out: dict[str, Any] = {
        "kind": kind,
        "description": desc,
        "compile_s": first - statistics.median(steps),
        "compile_cpu_s": first_cpu,
        "step_s": statistics.median(steps),
        "solve_cpu_s": solve,
    }
    if be is not None:
        out["budget"] = budget
        out["plans"] = [{k: v for k, v in p.to_dict().items() if k != "rates"} for p in be.plans]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="GPT-2 2x128, batch 4x64")
    ap.add_argument("--budgets", default="0.5", help="memfit budgets, comma-separated")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--rates", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], float(args.worker[1]), args.quick, json.loads(args.rates))))
        return

    from rich.console import Console

    import memfit.remat

    r = memfit.remat.calibrate("cpu")
    rates = {"flops_per_s": r.flops_per_s, "bytes_per_s": r.bytes_per_s, "op_overhead_s": r.op_overhead_s}
    configs = [("torch.compile", "torch.compile", 0.0)]
    configs += [(f"memfit {b}", "memfit", b) for b in map(float, args.budgets.split(","))]
    procs = {}
    for name, kind, budget in configs:  # all at once: CPU time is the measure, wall time is shared
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="memfit_compile_time_"),
            "TORCHINDUCTOR_COMPILE_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, __file__, "--worker", kind, str(budget), "--rates", json.dumps(rates)]
        procs[name] = subprocess.Popen(
            cmd + (["--quick"] if args.quick else []), env=env, stdout=subprocess.PIPE, text=True
        )
    results: dict[str, dict[str, Any]] = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        results[name] = (
            json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": f"rc {proc.returncode}"}
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"remat_compile_time{'_quick' if args.quick else ''}.json"
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "command": " ".join(sys.argv),
        "rates": rates,
        "configs": results,
    }
    out.write_text(json.dumps(record, indent=1))
    base = results["torch.compile"]

    def note(r: dict[str, Any]) -> str:
        plans = r.get("plans") or []
        if not plans:
            return ""
        p = plans[0]
        refine = (
            "refined"
            if p["refined"]
            else ("a refining compile ran, first plan kept" if len(r["solve_cpu_s"]) > 1 else "")
        )
        return (
            f"{p['recomputed_ops']} ops recomputed, peak {p['compiled_peak_bytes'] / 2**20:.0f} MiB; {refine}"
        )

    _table.print_table(
        Console(width=160),
        f"{base.get('description', '')}: cold compile — ratios against torch.compile measured in the same run",
        results,
        [
            ("compile CPU s", lambda r: f"{r['compile_cpu_s']:.1f}"),
            ("vs torch.compile", lambda r: f"{r['compile_cpu_s'] / base['compile_cpu_s']:.2f}"),
            ("compile wall s", lambda r: f"{r['compile_s']:.1f}"),
            ("vs torch.compile", lambda r: f"{r['compile_s'] / base['compile_s']:.2f}"),
            ("solve CPU s", lambda r: " + ".join(f"{s:.1f}" for s in r["solve_cpu_s"])),
        ],
        note=note,
        measured=lambda r: "compile_cpu_s" in r and "compile_cpu_s" in base,
        why=lambda r: str(r.get("error", "not measured")),
        width=80,
    )
    print(f"raw numbers: {out}")


if __name__ == "__main__":
    main()
