"""What do memfit's remat paths buy on models as users write them? The test zoo (``tests/remat_torch/zoo.py``: HF
BERT, Llama, T5, ViT, GPT-NeoX, Mixtral, Mamba from small configs; a torchvision-style ResNet-18), one table:

    model x {eager, per-block checkpointing, torch.compile, memfit eager at 0.5, memfit eager at its least memory,
             memfit backend at 0.5}

- **per-block checkpointing**: HF's ``gradient_checkpointing_enable()`` (non-reentrant), ``torch.utils.checkpoint``
  around each basic block of ResNet-18 (non-reentrant);
- **memfit eager**: ``memfit.remat.compile`` (the eager executor), budget 0.5 of the activation peak (or its least
  memory where 0.5 is below it: the row says so) and at its least memory; the row also gives the plan's predicted
  compute (``cost_overhead``) next to the measured step time relative to memfit without recomputation;
- **memfit backend**: ``torch.compile(backend=memfit.remat.backend(budget=0.5))`` (inductor).

Each model and group of configurations runs in two processes, both pricing memfit's plans with one ``Rates``
(calibrated once by the parent, so that both make the same plans). Memory is the step's RSS high-water mark above
the RSS before it (``VmHWM`` after a reset through ``/proc/self/clear_refs``), in the process run with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks go back to the OS and RSS follows live tensors; models are
built, captured and compiled (first step) on a thread of their own, and the heap is trimmed before each measured
step, so that the free heap chunks a capture leaves do not hold the measured step's tensors (``_in_thread``). Time
is ``time.process_time`` on one thread, median over interleaved steps, in the other process, with glibc's default
allocator: under the 64 KiB threshold every large tensor is fresh pages the kernel maps and zeroes, which slowed
the recomputing configurations more than the others (Mixtral ``grouped_mm`` at 0.5: 1.42x memfit's time without
recomputation under the threshold, 1.09x without it, predicted 1.08-1.12x). Every ratio is against eager autograd
measured in the same process (a compiled configuration runs in processes of its own, eager beside it). The **BN updates** column is how many times one step advanced the BatchNorm counters
(``num_batches_tracked``, the most over all BN layers): eager autograd and memfit 1, per-block checkpointing 2 (the
recomputed forward updates the running statistics again).

A configuration that cannot run on a model (capture, compile, plan or step fails) keeps its row with the reason
(``error``: the stage, the exception's type and first line); the memfit backend's row notes a graph whose budget is
below the least memory the compiled path reaches (it then runs that least-memory plan) and inductor's buffer plan.
The printout is one table, model x configuration, then one line per note.

    python benchmarks/remat_zoo.py                       # every model, "small" configs
    python benchmarks/remat_zoo.py --models resnet18 bert --steps 5
    python benchmarks/remat_zoo.py --size tiny           # a smoke run

Writes ``benchmarks/results/remat_zoo.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "remat_torch"))
import zoo

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = {  # configurations measured in one process (a torch.compile'd configuration gets a process of its own)
    "eager": ["eager", "checkpoint", "memfit none", "memfit 0.5", "memfit min"],
    "compile": ["eager", "torch.compile"],
    "backend": ["eager", "memfit backend 0.5"],
}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread of its own, so that what it frees stays in that thread's malloc arena.

    Captures and compiles allocate and free many small blocks; on the main thread they would coalesce into free
    heap chunks that glibc hands to the measured steps' tensors before it considers ``mmap`` (reused pages do not
    raise RSS; pages given back and reused raise it by their layout, not the live bytes). The measured steps run
    on the main thread, whose heap holds only what the model and the steps themselves allocated.
    """
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "exc" in box:
        raise box["exc"]
    return box.get("value")


def _trim() -> None:
    """Give freed heap pages back to the OS before a measured step.

    glibc serves an allocation from a free chunk of the heap before it considers ``mmap`` (the mmap threshold only
    applies when the heap has no room), so the memory a capture or compile freed would hold the step's tensors
    without raising RSS: T5's eager group measured 0 bytes for every configuration without this. ``malloc_trim(0)``
    releases the pages of every free chunk (``madvise(MADV_DONTNEED)``); reusing them faults them in again.
    """
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _bn_counts(model: torch.nn.Module) -> int | None:
    counts = [
        int(m.num_batches_tracked)
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    return max(counts) if counts else None


def _checkpointed(model: torch.nn.Module) -> None:
    """Per-block checkpointing as a user turns it on: HF's switch, else ``torch.utils.checkpoint`` per block."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    for block in zoo.blocks(model):
        inner = block.forward

        def forward(x: torch.Tensor, inner: Callable[..., torch.Tensor] = inner) -> torch.Tensor:
            out: torch.Tensor = torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False)
            return out

        block.forward = forward  # type: ignore[method-assign]


def _fresh(fn: Callable[[Any], Any], tag: str) -> Callable[[Any], Any]:
    """``fn`` with a code object of its own (dynamo caches compiled graphs per code object)."""
    import types

    code = fn.__code__.replace(co_name=f"step_{tag.replace(' ', '_').replace('.', '_')}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def make_configs(
    name: str, size: str, group: str, rates: Any = None
) -> tuple[dict[str, Callable[[], Any]], dict[str, torch.nn.Module], dict[str, Any]]:
    """One model per configuration (same initial weights), a zero-argument step for each, and plan facts.

    A configuration that cannot be built (capture, compile or plan fails) gets ``facts[cfg]["error"]`` and no step.
    """
    model, loss_fn, batch = zoo.BUILDERS[name](size)
    model.train()
    initial = copy.deepcopy(model)
    steps: dict[str, Callable[[], Any]] = {}
    models: dict[str, torch.nn.Module] = {}
    facts: dict[str, Any] = {}
    first: Any = None
    for cfg in GROUPS[group]:
        m = copy.deepcopy(initial)
        models[cfg] = m
        try:
            first = _build(cfg, m, loss_fn, batch, first, steps, facts, rates)
        except Exception as exc:
            if cfg == "eager":
                raise
            facts[cfg] = {"error": _why(exc, "build")}
    return steps, models, facts


def _why(exc: BaseException, stage: str) -> str:
    """One line for a configuration that could not run: where, the exception's type and its first line."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{stage}: {type(exc).__name__}: {first_line}"[:300]


def _build(
    cfg: str,
    m: torch.nn.Module,
    loss_fn: Callable[..., Any],
    batch: Any,
    first: Any,
    steps: dict[str, Callable[[], Any]],
    facts: dict[str, Any],
    rates: Any = None,
) -> Any:
    """Add configuration ``cfg``'s step on model ``m`` to ``steps``; returns the memfit eager capture (shared).
    ``rates``: the ``memfit.remat.Rates`` both memfit paths price with (the same in every process)."""
    import memfit.remat

    if cfg == "eager":
        steps[cfg] = lambda m=m: loss_fn(m, batch).backward()
    elif cfg == "checkpoint":
        _checkpointed(m)
        steps[cfg] = lambda m=m: loss_fn(m, batch).backward()
    elif cfg == "torch.compile":
        f = torch.compile(_fresh(lambda b, m=m: loss_fn(m, b), cfg))
        steps[cfg] = lambda f=f: f(batch).backward()
    elif cfg == "memfit backend 0.5":
        be = memfit.remat.backend(budget=0.5, rates=rates)
        f = torch.compile(_fresh(lambda b, m=m: loss_fn(m, b), cfg), backend=be)
        steps[cfg] = lambda f=f: f(batch).backward()
        facts[cfg] = {"backend": be}
    else:  # memfit eager: one capture, three schedules
        if first is None:
            first = memfit.remat.compile(m, loss_fn, batch, rates=rates)
        budget = cfg.split()[1]
        if budget == "none":
            step = first.with_budget(None)
        else:
            step = _feasible(first, batch, 0.5 if budget == "0.5" else 1, facts, cfg)
        step.model = m
        step.prepare(batch)
        facts.setdefault(cfg, {}).update(
            {"predicted_overhead": step.plan.cost_overhead, "peak_predicted_bytes": step.plan.peak_bytes}
        )
        steps[cfg] = lambda step=step: step(batch)
    return first


def _feasible(first: Any, batch: Any, budget: float | int, facts: dict[str, Any], cfg: str) -> Any:
    from memfit.remat import InfeasibleBudget

    step = first.with_budget(budget)
    try:
        step.prepare(batch)
    except InfeasibleBudget as exc:
        step = first.with_budget(exc.min_peak)
        if budget != 1:
            facts.setdefault(cfg, {})["note"] = (
                f"0.5 infeasible: at its least memory ({exc.min_peak / 2**20:.2f} MiB)"
            )
    return step


def worker(name: str, size: str, group: str, steps_n: int, mode: str, rates: Any = None) -> dict[str, Any]:
    """One model, one group of configurations, in this process: ``mode="rss"`` measures each step's peak RSS (run
    with ``MALLOC_MMAP_THRESHOLD_``), ``mode="time"`` its CPU time (run with glibc's default allocator: a threshold
    of 64 KiB maps and zeroes fresh pages for every large tensor, and recomputation allocates more of them)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    steps, models, facts = _in_thread(lambda: make_configs(name, size, group, rates))
    out: dict[str, Any] = {cfg: {} for cfg in GROUPS[group]}

    def guarded(cfg: str, stage: str, fn: Callable[[], Any]) -> None:
        """Run ``fn``; a configuration that fails is dropped with its reason (eager's failure fails the group)."""
        try:
            fn()
        except Exception as exc:
            if cfg == "eager":
                raise
            out[cfg]["error"] = _why(exc, stage)
            steps.pop(cfg)

    def first_step(cfg: str, fn: Callable[[], Any]) -> None:
        fn()
        out[cfg]["bn_updates"] = _bn_counts(models[cfg])

    def rss_step(cfg: str, fn: Callable[[], Any]) -> None:
        for p in models[cfg].parameters():
            p.grad = None
        fn()  # warm
        for p in models[cfg].parameters():
            p.grad = None
        _trim()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _rss_kib("VmRSS")
        fn()
        out[cfg]["rss_peak_bytes"] = (_rss_kib("VmHWM") - before) * 1024

    def first_steps() -> None:  # compiles, lazy state; BN counters read after exactly one step
        for cfg, fn in list(steps.items()):
            guarded(cfg, "first step", lambda cfg=cfg, fn=fn: first_step(cfg, fn))

    _in_thread(first_steps)
    if mode == "rss":
        for cfg, fn in list(steps.items()):
            guarded(cfg, "step", lambda cfg=cfg, fn=fn: rss_step(cfg, fn))
    times: dict[str, list[float]] = {cfg: [] for cfg in steps}
    for _ in range(steps_n if mode == "time" else 0):  # interleaved
        for cfg, fn in steps.items():
            for p in models[cfg].parameters():
                p.grad = None
            t = time.process_time()
            fn()
            times[cfg].append(time.process_time() - t)
    for cfg in out:
        f = facts.get(cfg, {})
        if "backend" in f:
            plans = f.pop("backend").plans
            out[cfg]["plans"] = [p.to_dict() for p in plans]
            note = _backend_note(plans)
            if note:
                out[cfg]["note"] = note
        if times.get(cfg):
            out[cfg]["step_seconds"] = statistics.median(times[cfg])
            out[cfg]["step_seconds_all"] = times[cfg]
        for k, v in f.items():
            out[cfg].setdefault(k, v)
    out["_seconds"] = time.perf_counter() - t0
    return out


def _backend_note(plans: list[Any]) -> str:
    """What the memfit backend's plans say about the budget: graphs it does not fit, and inductor's buffer plan."""
    mib = 2**20
    notes = []
    for i, p in enumerate(plans):
        tag = f"graph {i}: " if len(plans) > 1 else ""
        budget = p.budget_bytes or 0
        plan = (
            "" if p.compiled_peak_bytes is None else f"inductor's plan {p.compiled_peak_bytes / mib:.1f} MiB"
        )
        if p.min_peak_bytes > budget:
            notes.append(
                f"{tag}0.5 infeasible on the compiled path: least memory {p.min_peak_bytes / p.full_peak_bytes:.2f}"
                f" of torch's partition ({p.min_peak_bytes / mib:.1f} of {p.full_peak_bytes / mib:.1f} MiB predicted)"
            )
        elif not p.feasible:
            notes.append(f"{tag}{plan} over the budget ({budget / mib:.1f} MiB)")
            continue
        if plan:
            notes.append(f"{tag}{plan}, budget {budget / mib:.1f} MiB")
    return "; ".join(notes)


def _spawn(args: list[str], mmap_threshold: bool) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        print("\n".join(lines[-20:]), file=sys.stderr, flush=True)
        return {"error": lines[-1][:300] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge(rss: dict[str, Any], timed: dict[str, Any]) -> dict[str, Any]:
    """One row per configuration: memory and plan facts from the RSS process, times from the timing process (the
    same plans: both price with one ``Rates``), a configuration failed in either keeps the first error."""
    if "error" in rss or "error" in timed:
        return {"error": rss.get("error") or timed.get("error")}
    out: dict[str, Any] = {}
    for cfg, r in rss.items():
        if cfg.startswith("_"):
            continue
        t = timed.get(cfg, {})
        row = dict(r)
        if "error" in t and "error" not in row:
            row["error"] = t["error"]
        for k in ("step_seconds", "step_seconds_all"):
            if k in t:
                row[k] = t[k]
        if "predicted_overhead" in t and t["predicted_overhead"] != row.get("predicted_overhead"):
            row["note"] = "; ".join(
                x for x in (row.get("note"), "the timed plan differs from the measured one") if x
            )
        out[cfg] = row
    return out


def run(
    models: list[str], size: str, groups: list[str], steps_n: int, path: Path, rates_json: str | None = None
) -> dict[str, Any]:
    import memfit.remat

    torch.set_num_threads(1)
    if rates_json is None:  # once, for every worker: the same plans in the RSS and timing processes
        rates_json = json.dumps(dataclasses.asdict(memfit.remat.calibrate("cpu")))
    results: dict[str, Any] = json.loads(path.read_text())["models"] if path.exists() else {}
    for name in models:
        rows: dict[str, Any] = dict(results.get(name, {}))  # a run of some groups keeps the others' rows
        for group in groups:
            t0 = time.perf_counter()
            args = ["--worker", name, size, group, str(steps_n)]
            got = _merge(_spawn([*args, "rss", rates_json], True), _spawn([*args, "time", rates_json], False))
            print(f"{name} {group}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if "error" in got:
                for cfg in GROUPS[group][1:]:
                    rows[cfg] = {"error": got["error"]}
                continue
            eager = got.pop("eager")
            for cfg, r in got.items():
                if "rss_peak_bytes" in r:
                    r["memory_ratio"] = r["rss_peak_bytes"] / max(eager["rss_peak_bytes"], 1)
                if "step_seconds" in r:
                    r["time_ratio"] = r["step_seconds"] / eager["step_seconds"]
                r["eager_same_process"] = eager
                rows[cfg] = r
            if group == "eager" or "eager" not in rows:
                rows["eager"] = {**eager, "memory_ratio": 1.0, "time_ratio": 1.0}
        none = rows.get("memfit none", {})
        for cfg in ("memfit 0.5", "memfit min"):
            r = rows.get(cfg, {})
            if "step_seconds" in r and "step_seconds" in none:
                r["measured_overhead"] = r["step_seconds"] / none["step_seconds"]
        results[name] = rows
        _write(path, results, size, steps_n, rates_json)
    return results


def _write(path: Path, results: dict[str, Any], size: str, steps_n: int, rates: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, other work running beside it",
        "size": size,
        "steps": steps_n,
        "rates": json.loads(rates),
        "memory": "peak RSS, MALLOC_MMAP_THRESHOLD_=65536, in one process per model and group",
        "time": "time.process_time, glibc's default allocator, in a second process with the same Rates",
    }
    path.write_text(json.dumps({"meta": meta, "models": results}, indent=1))


ORDER = ["eager", "checkpoint", "torch.compile", "memfit 0.5", "memfit min", "memfit backend 0.5"]
LABELS = {
    "eager": "eager",
    "checkpoint": "per-block ckpt",
    "torch.compile": "torch.compile",
    "memfit 0.5": "memfit 0.5",
    "memfit min": "memfit least",
    "memfit backend 0.5": "backend 0.5",
}


def _cell(r: dict[str, Any]) -> str:
    """``memory / time`` ratios to eager (``x`` where the configuration did not run); BN updates where > 1."""
    if "memory_ratio" not in r or "time_ratio" not in r:
        return "x"
    bn = "" if r.get("bn_updates") in (None, 1) else f" BN{r['bn_updates']}"
    return f"{r['memory_ratio']:.2f} / {r['time_ratio']:.2f}{bn}"


def print_tables(results: dict[str, Any]) -> None:
    """One table, model x configuration (memory / time as ratios to eager in the same process), then the notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(
        title="step memory (RSS) / time, ratios to eager autograd in the same process; BNk: BatchNorm "
        "statistics updated k times per step"
    )
    table.add_column("model", justify="left")
    table.add_column("eager MiB", justify="right")
    for cfg in ORDER:
        table.add_column(LABELS[cfg], justify="right")
    notes: list[str] = []
    for name, rows in results.items():
        eager = rows.get("eager", {})
        mib = f"{eager['rss_peak_bytes'] / 2**20:.1f}" if "rss_peak_bytes" in eager else "x"
        table.add_row(name, mib, *[_cell(rows.get(cfg, {})) for cfg in ORDER])
        for cfg in ORDER:
            r = rows.get(cfg, {})
            why = r.get("error") or ("" if "memory_ratio" in r else "not run")
            bits = [why, r.get("note", "")]
            if "predicted_overhead" in r and "measured_overhead" in r:
                bits.append(
                    f"compute {r['predicted_overhead']:.2f}x predicted, {r['measured_overhead']:.2f}x measured"
                )
            text = "; ".join(b for b in bits if b)
            if text:
                notes.append(f"{name}, {LABELS[cfg]}: {text}")
    console.print(table)
    for line in notes:
        console.print(line, highlight=False, soft_wrap=True)


def print_markdown(results: dict[str, Any]) -> None:
    """The same table as Markdown (the README's), with the eager executor's predicted / measured compute."""
    order = ORDER[1:]
    head = [
        "model",
        "eager MiB",
        *(LABELS[c] for c in order),
        "memfit compute, predicted / measured (0.5; least)",
    ]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 2) + "---|")
    for name, rows in results.items():
        eager = rows.get("eager", {})
        mib = f"{eager['rss_peak_bytes'] / 2**20:.1f}" if "rss_peak_bytes" in eager else "x"
        cells = [_cell(rows.get(cfg, {})).replace("BN", "BN ") for cfg in order]
        comp = "; ".join(
            f"{r['predicted_overhead']:.2f} / {r['measured_overhead']:.2f}"
            for r in (rows.get("memfit 0.5", {}), rows.get("memfit min", {}))
            if "predicted_overhead" in r and "measured_overhead" in r
        )
        print(f"| {name} | {mib} | " + " | ".join(cells) + f" | {comp} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        import memfit.remat

        name, size, group, steps_n, mode = (
            sys.argv[2],
            sys.argv[3],
            sys.argv[4],
            int(sys.argv[5]),
            sys.argv[6],
        )
        rates = memfit.remat.Rates(**json.loads(sys.argv[7]))
        print(json.dumps(worker(name, size, group, steps_n, mode, rates)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(zoo.BUILDERS))
    ap.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "remat_zoo.json")
    ap.add_argument(
        "--rates",
        default=None,
        help="memfit.remat.Rates fields as JSON (default: calibrated once at the start; a run split across "
        "processes passes one set to each for the same plans)",
    )
    ap.add_argument("--report", action="store_true", help="print the tables of --out without running")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args()
    if not args.report:
        run(args.models, args.size, args.groups, args.steps, args.out, args.rates)
    results = json.loads(args.out.read_text())["models"]
    (print_markdown if args.markdown else print_tables)(results)


if __name__ == "__main__":
    main()
