"""Remat on the compiled path (issue 8): memfit's solver deciding what ``torch.compile`` saves, side by side.

One HF GPT-2 (6 layers, d=512, vocab 8192, eager attention, no dropout, batch 8x256, float32, forward +
backward), in one run:

- eager autograd (the baseline every ratio is against);
- per-block ``torch.utils.checkpoint`` (HF ``gradient_checkpointing_enable``, non-reentrant);
- ``torch.compile`` (inductor), and with ``activation_memory_budget`` 0.5 and 0.2;
- ``torch.compile(backend=memfit.remat.backend(budget=B))`` ("memfit-compiled B") for B in 1.0 .. 0.1; a budget
  the plan calls infeasible (below its smallest peak) is reported and skipped, with every smaller one.

Peak = step memory above the pre-step baseline: the process RSS high-water mark of the step (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) in a process whose glibc returns large blocks to the OS
(``MALLOC_MMAP_THRESHOLD_=65536``), so that RSS follows live tensors; median of 3 steps. Time = median step with
the default allocator (forcing mmap distorts time), configurations interleaved step by step, over ``--procs``
processes x ``--steps`` steps. Compile s = the first call (compile + one step) minus the median step, taken in the
first timing process, which compiles from an empty inductor cache; the later processes reuse that cache. Every
process imports memfit from a copy of ``src/memfit`` taken when the run starts (one version for the whole run), and
prices recomputation with one set of device speeds measured by the parent (``memfit.remat.calibrate``), so that
every process compiles the same plan (a note says if one did not); the prediction checked against the measured peak
is the plan of the memory process itself.

    python benchmarks/remat_compiled.py            # the issue's measurement (20-40 min on 2 cores)
    python benchmarks/remat_compiled.py --quick    # GPT-2 2x128, batch 4x64, a smoke run

Writes ``benchmarks/results/remat_compiled.json`` (raw numbers, date, machine, torch version, command) and the
plot ``benchmarks/results/remat_compiled.png`` (step time vs peak memory, both against eager).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _table
from remat_sweep import _rss_kib, build, fresh_function, set_block_checkpointing

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2)
COMPILE_BUDGETS = (1.0, 0.5, 0.2)  # torch's activation_memory_budget; 1.0 is torch.compile's default
QUICK_BUDGETS = (1.0, 0.7)
QUICK_COMPILE_BUDGETS = (1.0, 0.5)
MEMORY_STEPS = 3  # measured steps per configuration in the memory process (median)
MONOTONE_TOL_MIB = 0.5  # RSS noise: the RSS, VmHWM and MemTracker agreed within 0.5 MiB
MIB = 2.0**20


# ---------------------------------------------------------------------------------------------- configs
def compile_name(budget: float) -> str:
    return "compile" if budget == 1.0 else f"compile-amb-{budget}"


def memfit_name(budget: float) -> str:
    return f"memfit-compiled-{budget}"


def matched_name(cfg: str) -> str:
    """memfit with a byte budget equal to the measured peak of the torch.compile configuration ``cfg``."""
    return f"memfit-compiled-at-{cfg}"


def label(cfg: str) -> str:
    """The configuration as the issue's table names it."""
    if cfg == "eager":
        return "eager"
    if cfg == "ckpt-per-block":
        return "per-block torch.utils.checkpoint (HF, non-reentrant)"
    if cfg == "compile":
        return "torch.compile (inductor)"
    if cfg.startswith("compile-amb-"):
        return f"torch.compile + activation_memory_budget={cfg.removeprefix('compile-amb-')}"
    if cfg.startswith("memfit-compiled-at-"):
        return f"memfit-compiled at the peak of {label(cfg.removeprefix('memfit-compiled-at-'))}"
    return cfg.replace("memfit-compiled-", "memfit-compiled ")


def _status(msg: str) -> None:
    print(f"@@ {msg}", file=sys.stderr, flush=True)


def make_configs(
    quick: bool,
    budgets: list[float],
    compile_budgets: list[float],
    rates: dict[str, float],
    matched: dict[str, int],
) -> tuple[list[torch.nn.Parameter], dict[str, Callable[[], Any]], dict[str, dict[str, Any]]]:
    """Build the model and compile every configuration (its first call, timed).

    Returns the parameters (their ``.grad`` is reset before each step), name -> a function running one
    forward+backward, and name -> facts.
    """
    import torch._dynamo
    import torch._dynamo.utils
    import torch._functorch.config as functorch_config

    import memfit.remat

    # Safety net: should dynamo break the graph, the resumed frames inside HF's code are shared by every
    # configuration; fail loudly rather than fall back to eager past the recompile limit.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    model, loss_fn, batch, _ = build("gpt2", quick)
    # Per-block checkpointing runs on a model of its own (same seed, same weights), switched on once: toggling it
    # on the shared model before every step re-binds module attributes that dynamo guards on, and every compiled
    # configuration would then recompile at its next call.
    ckpt_model = build("gpt2", quick)[0]
    set_block_checkpointing(ckpt_model, True)
    params = [*model.parameters(), *ckpt_model.parameters()]
    steps: dict[str, Callable[[], Any]] = {}
    info: dict[str, dict[str, Any]] = {}

    def zero_grad() -> None:
        for p in params:
            p.grad = None

    def eager() -> Any:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    def ckpt() -> Any:
        loss = loss_fn(ckpt_model, batch)
        loss.backward()
        return loss

    for name, fn, kind in (("eager", eager, "eager"), ("ckpt-per-block", ckpt, "torch.utils.checkpoint")):
        _status(f"warm-up {name}")
        zero_grad()
        t0 = time.perf_counter()
        fn()
        steps[name], info[name] = fn, {"kind": kind, "first_call_s": time.perf_counter() - t0}

    def step(b: Any) -> torch.Tensor:
        return loss_fn(model, b)

    def first_call(name: str, compiled: Callable[[Any], torch.Tensor]) -> dict[str, Any]:
        zero_grad()
        graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        compiled(batch).backward()  # compiles the forward, then (lazily) the backward
        facts = {
            "first_call_s": time.perf_counter() - t0,
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs0,
        }
        steps[name] = (lambda f: lambda: f(batch).backward())(compiled)
        return facts

    for budget in compile_budgets:
        name = compile_name(budget)
        _status(f"compiling {name}")
        compiled = torch.compile(fresh_function(step, name.replace("-", "_").replace(".", "_")))
        info[name] = {"kind": "torch.compile", "activation_memory_budget": budget}
        try:
            # the budget is read when the joint graph is partitioned, during the first call
            with functorch_config.patch(activation_memory_budget=budget):
                info[name].update(first_call(name, compiled))
        except Exception as exc:  # report, go on with the other configurations
            info[name]["error"] = f"{type(exc).__name__}: {exc}"[:500]

    backend = getattr(memfit.remat, "backend", None)

    def compile_memfit(name: str, budget: float | int, facts: dict[str, Any]) -> bool:
        """Compile one memfit configuration; ``False`` when its plan is infeasible (it is then not run)."""
        info[name] = {"kind": "memfit", "budget": budget, **facts}
        if backend is None:
            info[name]["error"] = "memfit.remat.backend is not available"
            return True
        _status(f"compiling {name}")
        be = backend(budget=budget, rates=memfit.remat.Rates(**rates))
        compiled = torch.compile(fresh_function(step, name.replace("-", "_").replace(".", "_")), backend=be)
        try:
            info[name].update(first_call(name, compiled))
        except Exception as exc:
            info[name]["error"] = f"{type(exc).__name__}: {exc}"[:500]
            steps.pop(name, None)
            return True
        plans = list(be.plans)
        info[name].update(
            plans=[p.to_dict() for p in plans],
            budget_bytes=sum(p.budget_bytes or 0 for p in plans),
            predicted_peak_bytes=sum(p.predicted_peak_bytes for p in plans),
            # inductor's own buffer plan, read from its generated code (memfit's prediction of record on this path)
            compiled_peak_bytes=(
                sum(p.compiled_peak_bytes for p in plans)
                if plans and all(p.compiled_peak_bytes is not None for p in plans)
                else None
            ),
            refined=any(p.refined for p in plans),
            full_peak_bytes=sum(p.full_peak_bytes for p in plans),
            min_peak_bytes=sum(p.min_peak_bytes for p in plans),
            recompute_cost_s=sum(p.recompute_cost_s for p in plans),
            recomputed_ops=sum(p.recomputed_ops for p in plans),
            feasible=all(p.feasible for p in plans),
        )
        if not info[name]["feasible"]:
            steps.pop(name)
        return bool(info[name]["feasible"])

    for i, budget in enumerate(sorted(budgets, reverse=True)):
        if not compile_memfit(memfit_name(budget), budget, {}):
            # the plan fell back to its min-peak choice: skip every smaller budget
            for smaller in sorted(budgets, reverse=True)[i + 1 :]:
                info[memfit_name(smaller)] = {
                    "kind": "memfit",
                    "budget": smaller,
                    "skipped": f"below the smallest feasible budget (plan of {budget} is infeasible)",
                }
            break
    # memfit given, in bytes, the peak a torch.compile configuration was measured at (target (a) asks for that)
    for cfg, nbytes in matched.items():
        compile_memfit(matched_name(cfg), nbytes, {"matches": cfg})
    zero_grad()
    return params, steps, info


# ---------------------------------------------------------------------------------------------- workers
def _memfit_source_hash() -> str:
    """A hash of memfit's remat sources, to tell whether they changed between the processes of a run."""
    import hashlib

    import memfit.remat

    h = hashlib.sha256()
    for f in sorted(Path(memfit.remat.__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _graphs_compiled() -> int:
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _worker_result(info: dict[str, dict[str, Any]], graphs0: int) -> dict[str, Any]:
    import memfit

    return {
        "configs": info,
        "recompiled_while_measuring": _graphs_compiled() - graphs0,
        "memfit_source": _memfit_source_hash(),
        "memfit_file": memfit.__file__,
    }


def worker_memory(
    quick: bool,
    budgets: list[float],
    compile_budgets: list[float],
    rates: dict[str, float],
    matched: dict[str, int],
) -> dict[str, Any]:
    params, steps, info = make_configs(quick, budgets, compile_budgets, rates, matched)
    graphs0 = _graphs_compiled()
    for cfg, fn in steps.items():
        _status(f"memory {cfg}")
        peaks = []
        for _ in range(1 + MEMORY_STEPS):  # one warm-up step after the first call, then the measured ones
            for p in params:
                p.grad = None
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = _rss_kib("VmRSS")
            fn()
            peaks.append((_rss_kib("VmHWM") - before) * 1024)
        info[cfg]["rss_peaks_bytes"] = peaks[1:]
        info[cfg]["peak_bytes"] = statistics.median(peaks[1:])
    return _worker_result(info, graphs0)


def worker_time(
    quick: bool,
    budgets: list[float],
    compile_budgets: list[float],
    steps_per_cfg: int,
    rates: dict[str, float],
    matched: dict[str, int],
) -> dict[str, Any]:
    params, steps, info = make_configs(quick, budgets, compile_budgets, rates, matched)
    for cfg in steps:
        info[cfg]["times"] = []
    graphs0 = _graphs_compiled()
    for k in range(-1, steps_per_cfg):  # one untimed warm-up round after the first calls
        _status(f"timed step {k + 1}/{steps_per_cfg}" if k >= 0 else "warm-up round")
        for cfg, fn in steps.items():  # interleaved: drift on a shared machine hits every configuration alike
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            fn()
            if k >= 0:
                info[cfg]["times"].append(time.perf_counter() - t0)
    return _worker_result(info, graphs0)


def _spawn(args: list[str], env: dict[str, str], on_status: Callable[[str], None]) -> dict[str, Any]:
    """Run this script as a worker; relay its status lines; return the JSON it writes."""
    with tempfile.TemporaryDirectory(prefix="remat_compiled_") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen(
            [sys.executable, __file__, *args, "--result-file", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        assert proc.stderr is not None
        tail: collections.deque[str] = collections.deque(maxlen=60)
        for line in proc.stderr:
            if line.startswith("@@ "):
                on_status(line[3:].strip())
            else:
                tail.append(line)
        if proc.wait() != 0:
            raise RuntimeError(f"worker {' '.join(args)} failed:\n{''.join(tail)}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------- run
def run(
    quick: bool,
    budgets: list[float],
    compile_budgets: list[float],
    procs: int,
    steps_per_cfg: int,
    cache_dir: str | None,
    snapshot: str,
    rates: dict[str, float],
    console: Any,
) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    common = ["--quick"] if quick else []
    # every worker imports memfit from one snapshot of its sources, taken when the run starts
    path = os.pathsep.join(p for p in (snapshot, os.environ.get("PYTHONPATH", "")) if p)
    env_time = {"PYTHONPATH": path}
    if cache_dir is not None:
        env_time["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    env_mem = {**env_time, "MALLOC_MMAP_THRESHOLD_": "65536"}
    configs: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    sources: set[str] = set()
    first_calls: dict[str, list[float]] = {}  # per process, in the order run: time 1 (cold), memory, time 2..
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} processes"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=2 + procs)

        def spawn(
            what: str, kind: str, bud: list[float], env: dict[str, str], match: dict[str, int]
        ) -> dict[str, Any]:
            args = ["--worker", kind, "--steps", str(steps_per_cfg), *common]
            args += ["--budgets", ",".join(map(str, bud)) or "none"]
            args += ["--compile-budgets", ",".join(map(str, compile_budgets)) or "none"]
            args += ["--rates", json.dumps(rates), "--matched", json.dumps(match)]
            got = _spawn(args, env, lambda s: progress.update(task, description=f"{what}: {s}"))
            progress.advance(task)
            if got["recompiled_while_measuring"]:
                notes.append(f"{what}: {got['recompiled_while_measuring']} graphs recompiled while measuring")
            sources.add(got["memfit_source"])
            if not got["memfit_file"].startswith(snapshot):
                notes.append(f"{what}: imported memfit from {got['memfit_file']}, not the snapshot")
            for cfg, facts in got["configs"].items():
                if "first_call_s" in facts:
                    first_calls.setdefault(cfg, []).append(round(facts["first_call_s"], 3))
            return dict(got["configs"])

        # 0: the peaks torch.compile's configurations reach (memory process, inductor cache of its own so that
        # process 1 still compiles cold); memfit is then also given each of them as a byte budget
        with tempfile.TemporaryDirectory(prefix="remat_compiled_levels_") as levels_cache:
            levels = spawn(
                "torch.compile's memory levels",
                "memory",
                [],
                {**env_mem, "TORCHINDUCTOR_CACHE_DIR": levels_cache},
                {},
            )
        matched = {
            cfg: int(facts["peak_bytes"])
            for cfg, facts in levels.items()
            if facts.get("kind") == "torch.compile" and "peak_bytes" in facts
        }
        # 1: timing process 1, compiling from an empty cache (compile s), finds the infeasible budgets
        first = spawn(f"time 1/{procs}", "time", budgets, env_time, matched)
        feasible = [b for b in budgets if "times" in first.get(memfit_name(b), {})]
        matched = {c: b for c, b in matched.items() if "times" in first.get(matched_name(c), {})}
        for cfg, facts in first.items():
            configs[cfg] = {k: v for k, v in facts.items() if k != "times"}
            if "times" in facts:
                configs[cfg]["compile_s"] = facts["first_call_s"] - statistics.median(facts["times"])
                configs[cfg]["step_seconds_all"] = list(facts["times"])
        # 2: memory (glibc forced to mmap large blocks), on the warm cache
        mem = spawn("memory (MALLOC_MMAP_THRESHOLD_=65536)", "memory", feasible, env_mem, matched)
        for cfg, facts in mem.items():
            row = configs.setdefault(cfg, {})
            for key in ("peak_bytes", "rss_peaks_bytes", "error"):
                if key in facts:
                    row[key] = facts[key]
            row["memory_process_graphs"] = facts.get("graphs")
            # the plan the memory process compiled: the prediction its measurement is checked against
            for key in ("compiled_peak_bytes", "predicted_peak_bytes"):
                if key in facts:
                    row[f"memory_process_{key}"] = facts[key]
            _same_plan(notes, "memory process", cfg, row, facts)
        # 3: the other timing processes
        for i in range(1, procs):
            got = spawn(f"time {i + 1}/{procs}", "time", feasible, env_time, matched)
            for cfg, facts in got.items():
                _same_plan(notes, f"timing process {i + 1}", cfg, configs.get(cfg, {}), facts)
                if "times" in facts:
                    configs[cfg].setdefault("step_seconds_all", []).extend(facts["times"])
    if len(sources) > 1:
        notes.append(f"the workers ran {len(sources)} versions of memfit's remat sources: rerun")
    if sources and _memfit_source_hash() not in sources:
        notes.append(
            "memfit's sources changed during the run: the numbers are for the snapshot taken at its start"
        )
    for cfg, r in configs.items():
        r["first_call_s_by_process"] = first_calls.get(cfg, [])
        if r.get("step_seconds_all"):
            r["step_seconds"] = statistics.median(r["step_seconds_all"])
        if r.get("graphs", 1) > 1:
            notes.append(f"{cfg}: dynamo broke the step into {r['graphs']} graphs")
        if r.get("kind") in ("torch.compile", "memfit") and r.get("graphs") == 0 and "error" not in r:
            notes.append(f"{cfg}: nothing was compiled (a dynamo cache hit?)")
    order = ["eager", "ckpt-per-block"] + [compile_name(b) for b in compile_budgets]
    order += [memfit_name(b) for b in sorted(budgets, reverse=True)]
    order += sorted(
        (c for c in configs if c.startswith("memfit-compiled-at-")), key=lambda c: -configs[c]["budget"]
    )
    return {
        "configs": {c: configs[c] for c in order if c in configs},
        "compile_levels_bytes": matched,
        "notes": notes,
        "memfit_source_sha256": sorted(sources),
    }


def _same_plan(notes: list[str], what: str, cfg: str, first: dict[str, Any], facts: dict[str, Any]) -> None:
    """Note a memfit configuration whose plan in this process differs from the first timing process's (every
    process is given the same rates, so the plans should agree)."""
    keys = ("predicted_peak_bytes", "compiled_peak_bytes", "recomputed_ops")
    if facts.get("kind") != "memfit" or not all(k in first and k in facts for k in keys):
        return
    if any(first[k] != facts[k] for k in keys):
        got = ", ".join(f"{k} {first[k]} vs {facts[k]}" for k in keys)
        notes.append(f"{cfg}: the {what} compiled another plan than timing process 1 ({got})")


# ---------------------------------------------------------------------------------------------- report
def _measured(r: dict[str, Any]) -> bool:
    return "peak_bytes" in r and "step_seconds" in r


def print_table(console: Any, description: str, configs: dict[str, dict[str, Any]]) -> None:
    eager = configs["eager"]

    def why(r: dict[str, Any]) -> str:
        if r.get("feasible") is False:
            return f"infeasible: plan's min peak {r['min_peak_bytes'] / MIB:.1f} MiB; skipped"
        return str(r.get("skipped") or r.get("error") or "not measured")

    def pred(r: dict[str, Any]) -> str:
        p = r.get("compiled_peak_bytes") or r.get("predicted_peak_bytes")
        return "" if p is None else f"{p / MIB:.1f}"

    def note(r: dict[str, Any]) -> str:
        text = ""
        if r.get("kind") == "memfit":
            text = f"{r['recomputed_ops']} ops recomputed, pred. +{r['recompute_cost_s']:.3f} s"
        if r.get("graphs", 1) > 1:
            text = f"{r['graphs']} graphs! " + text
        return text

    _table.print_table(
        console,
        f"{description}, forward + backward — ratios against eager measured in the same run",
        configs,
        [
            ("peak MiB", lambda r: f"{r['peak_bytes'] / MIB:.1f}"),
            ("vs eager", lambda r: f"{r['peak_bytes'] / eager['peak_bytes']:.2f}"),
            ("predicted peak MiB", pred),
            ("step s", lambda r: f"{r['step_seconds']:.3f}"),
            ("vs eager", lambda r: f"{r['step_seconds'] / eager['step_seconds']:.2f}"),
            (
                "compile s",
                lambda r: (
                    f"{r['compile_s']:.1f}"
                    if "compile_s" in r and r["kind"] in ("torch.compile", "memfit")
                    else ""
                ),
            ),
        ],
        note=note,
        measured=_measured,
        why=why,
        width=80,
        label=label,
    )


def paired_ratio(a: list[float], b: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Median of the per-step ratios ``a[i] / b[i]`` and its bootstrap 95% interval.

    Step ``i`` of two configurations ran back to back in the same process (the configurations are interleaved step
    by step), so the ratio of the pair cancels most of the machine's drift; the interval is over resampled pairs
    (seeded: the same numbers give the same interval)."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def check_targets(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets (a)-(d), each with PASS/FAIL and the numbers behind it."""
    measured = {c: r for c, r in configs.items() if _measured(r)}
    eager = measured["eager"]
    memfit = sorted(
        ((r["budget_bytes"], c, r) for c, r in measured.items() if r.get("kind") == "memfit"),
        key=lambda row: row[0],
    )

    def desc(c: str) -> str:
        r = measured[c]
        return (
            f"{label(c)}: {r['peak_bytes'] / MIB:.1f} MiB ({r['peak_bytes'] / eager['peak_bytes']:.2f}), "
            f"{r['step_seconds']:.3f} s ({r['step_seconds'] / eager['step_seconds']:.2f})"
        )

    def best_at_or_below(peak: float) -> str | None:
        """The fastest memfit row whose measured peak is at or below ``peak``."""
        cands = [(r["step_seconds"], c) for _, c, r in memfit if r["peak_bytes"] <= peak]
        return min(cands)[1] if cands else None

    def paired(m: str, ref: str) -> str:
        a, b = measured[m].get("step_seconds_all", []), measured[ref].get("step_seconds_all", [])
        if len(a) != len(b) or len(a) < 3:
            return "no paired steps"
        med, lo, hi = paired_ratio(a, b)
        verdict = "faster" if hi < 1 else "slower" if lo > 1 else "level within the noise"
        return f"paired per-step ratio x{med:.3f} [{lo:.3f}, {hi:.3f}] ({verdict})"

    out: list[dict[str, Any]] = []
    if not memfit:
        for t in "abcd":
            out.append({"target": t, "passed": None, "lines": ["n/a: no memfit-compiled row was measured"]})
        return out

    lines, ok = [], True
    compiled = [c for c, r in measured.items() if r.get("kind") == "torch.compile"]
    for c in compiled:
        m = best_at_or_below(measured[c]["peak_bytes"])
        if m is None:
            ok = False
            lines.append(f"FAIL {desc(c)} <- no memfit-compiled row at or below this peak")
            continue
        good = measured[m]["step_seconds"] <= measured[c]["step_seconds"]
        ok &= good
        ratio = measured[m]["step_seconds"] / measured[c]["step_seconds"]
        lines.append(
            f"{'ok  ' if good else 'FAIL'} {desc(c)} <- {desc(m)}: time x{ratio:.3f} of it (medians); "
            + paired(m, c)
        )
    out.append(
        {"target": "a", "passed": ok if compiled else None, "lines": lines or ["n/a: no compile rows"]}
    )

    if "ckpt-per-block" in measured:
        k = measured["ckpt-per-block"]
        m = best_at_or_below(k["peak_bytes"])
        if m is None:
            lines, ok = [f"{desc('ckpt-per-block')} <- no memfit-compiled row at or below this peak"], False
        else:
            ok = measured[m]["step_seconds"] < k["step_seconds"]
            ratio = measured[m]["step_seconds"] / k["step_seconds"]
            lines = [
                f"{desc('ckpt-per-block')} <- {desc(m)}: time x{ratio:.3f} of it (medians); "
                + paired(m, "ckpt-per-block")
            ]
        out.append({"target": "b", "passed": ok, "lines": lines})
    else:
        out.append({"target": "b", "passed": None, "lines": ["n/a: per-block checkpointing not measured"]})

    peaks = [(f"{b / MIB:.1f}", r["peak_bytes"] / MIB) for b, _, r in memfit]
    bad = [(lo, hi) for lo, hi in itertools.pairwise(peaks) if lo[1] > hi[1] + MONOTONE_TOL_MIB]
    lines = ["budget MiB -> measured MiB: " + ", ".join(f"{b}: {p:.1f}" for b, p in peaks)]
    lines += [f"FAIL budget {lo[0]}: {lo[1]:.1f} MiB > budget {hi[0]}: {hi[1]:.1f} MiB" for lo, hi in bad]
    lines.append(f"(non-decreasing in the budget, tolerance {MONOTONE_TOL_MIB} MiB of RSS noise)")
    out.append({"target": "c", "passed": not bad, "lines": lines})

    lines, ok = [], True
    for _, c, r in memfit:
        # the memory process's own plan (the one measured); the first timing process's where it is not recorded
        pred = (
            r.get("memory_process_compiled_peak_bytes")
            or r.get("compiled_peak_bytes")
            or r["predicted_peak_bytes"]
        )
        err = pred / r["peak_bytes"] - 1
        ok &= abs(err) <= 0.10
        lines.append(
            f"{'ok  ' if abs(err) <= 0.10 else 'FAIL'} {label(c)}: predicted (inductor's buffer plan) "
            f"{pred / MIB:.1f} MiB, measured {r['peak_bytes'] / MIB:.1f} MiB ({err:+.1%}); memfit's model "
            f"{r['predicted_peak_bytes'] / MIB:.1f} MiB ({r['predicted_peak_bytes'] / r['peak_bytes'] - 1:+.1%})"
            + (", refined" if r.get("refined") else "")
        )
    out.append({"target": "d", "passed": ok, "lines": lines})
    return out


TARGETS = {
    "a": "at every memory level torch.compile(+activation_memory_budget) reaches, memfit-compiled at equal or "
    "lower peak is at least as fast",
    "b": "at per-block checkpointing's peak, memfit-compiled at equal or lower peak is faster than it",
    "c": "memfit-compiled's measured peak is monotone in the budget",
    "d": "memfit-compiled's predicted peak is within 10% of the measured peak",
}


def print_targets(console: Any, checks: list[dict[str, Any]]) -> None:
    console.print("[bold]Issue 8 targets[/bold]")
    for t in checks:
        verdict = {True: "[green]PASS[/green]", False: "[red]FAIL[/red]", None: "[yellow]N/A[/yellow]"}
        console.print(f"({t['target']}) {verdict[t['passed']]}  {TARGETS[t['target']]}")
        for line in t["lines"]:
            console.print(f"      {line}", highlight=False)


def report(console: Any, results: dict[str, Any]) -> None:
    """Print a run's table, notes and target checks; the checks go into ``results["targets"]``."""
    print_table(console, results["description"], results["configs"])
    for note in results["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    results["targets"] = check_targets(results["configs"])
    print_targets(console, results["targets"])


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = {c: r for c, r in results["configs"].items() if _measured(r)}
    eager = configs["eager"]

    def xy(r: dict[str, Any]) -> tuple[float, float]:
        return r["peak_bytes"] / eager["peak_bytes"], r["step_seconds"] / eager["step_seconds"]

    def order(r: dict[str, Any]) -> float:  # a family of configurations, joined in the order of its budget
        return float(r.get("budget_bytes", r.get("activation_memory_budget", 0.0)))

    style = {
        "eager": ("black", "*", 220, "eager autograd"),
        "torch.utils.checkpoint": ("tab:red", "s", 90, "per-block torch.utils.checkpoint"),
        "torch.compile": ("tab:green", "^", 100, "torch.compile, label: activation_memory_budget"),
        "memfit": ("tab:blue", "o", 80, "torch.compile + memfit backend, label: budget"),
    }
    fig, ax = plt.subplots(figsize=(10, 7))
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    for kind, (color, marker, size, legend) in style.items():
        rows = sorted(
            ((c, r) for c, r in configs.items() if r.get("kind") == kind), key=lambda cr: order(cr[1])
        )
        if not rows:
            continue
        pts = [xy(r) for _, r in rows]
        if len(rows) > 1:
            ax.plot(*zip(*pts, strict=True), color=color, lw=1, alpha=0.5)
        ax.scatter(*zip(*pts, strict=True), c=color, marker=marker, s=size, label=legend, zorder=3)
        for (c, r), (x, y) in zip(rows, pts, strict=True):
            if kind == "torch.compile":
                text = "compile (1.0)" if c == "compile" else f"{r['activation_memory_budget']}"
            elif kind == "memfit":
                text = (
                    "@" + r["matches"].replace("compile-amb-", "amb ").replace("compile", "compile's peak")
                    if "matches" in r
                    else f"{r['budget']}"
                )
            else:
                text = {"eager": "eager", "ckpt-per-block": "per-block checkpoint"}[c]
            above = kind != "memfit"
            ax.annotate(
                text,
                (x, y),
                xytext=(7, 7) if above else (7, -14),
                textcoords="offset points",
                fontsize=9,
                color=color,
            )
    xs, ys = zip(*(xy(r) for r in configs.values()), strict=True)
    ax.set_xlim(0, max(xs) * 1.12)
    ax.set_ylim(0, max(ys) * 1.12)
    ax.set_xlabel("measured peak step memory / eager's (process RSS above the pre-step baseline)")
    ax.set_ylabel("median step time / eager's")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=9, frameon=False)
    m = results["machine"]
    ax.set_title(
        f"{results['description']}, forward + backward: lower left is better\n"
        f"eager = {eager['peak_bytes'] / MIB:.0f} MiB, {eager['step_seconds']:.2f} s; "
        f"{results['date'][:16].replace('T', ' ')} UTC, {m['cpus']} CPUs, torch {m['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    """Comma-separated numbers; ``none`` for none."""
    return [] if text.strip() == "none" else [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="GPT-2 2x128, batch 4x64, few configurations and steps"
    )
    ap.add_argument("--budgets", type=_floats, default=None, help="memfit budgets, comma-separated")
    ap.add_argument(
        "--compile-budgets", type=_floats, default=None, help="torch activation_memory_budget values"
    )
    ap.add_argument("--procs", type=int, default=None, help="timing processes (default 5; quick 1)")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per configuration and process (5; 2)"
    )
    ap.add_argument("--out", default=None, help="result file stem (default remat_compiled[_quick])")
    ap.add_argument(
        "--warm-cache",
        action="store_true",
        help="use torch's own inductor cache dir instead of a fresh one (faster; compile s then not cold); "
        "--quick always does",
    )
    ap.add_argument(
        "--report",
        metavar="JSON",
        help="print the table and the targets of a finished run's result file (and store the targets' lines in it) "
        "instead of running",
    )
    ap.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    ap.add_argument("--rates", help=argparse.SUPPRESS)
    ap.add_argument("--matched", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    budgets = args.budgets if args.budgets is not None else list(QUICK_BUDGETS if args.quick else BUDGETS)
    compile_budgets = (
        args.compile_budgets
        if args.compile_budgets is not None
        else list(QUICK_COMPILE_BUDGETS if args.quick else COMPILE_BUDGETS)
    )
    steps = args.steps or (2 if args.quick else 5)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.worker:
        rates, matched = json.loads(args.rates), json.loads(args.matched)
        if args.worker == "memory":
            got = worker_memory(args.quick, budgets, compile_budgets, rates, matched)
        else:
            got = worker_time(args.quick, budgets, compile_budgets, steps, rates, matched)
        Path(args.result_file).write_text(json.dumps(got))
        return

    from rich.console import Console

    console = Console(width=180)
    if args.report:
        path = Path(args.report)
        results = json.loads(path.read_text())
        report(console, results)
        path.write_text(json.dumps(results, indent=1))
        return
    t0 = time.perf_counter()
    procs = args.procs or (1 if args.quick else 5)
    description = build("gpt2", args.quick)[3]
    import memfit.remat

    # one set of device speeds for every process: the plans then agree across processes (calibrated in each,
    # they move with the machine's load, and the plans with them)
    rates = dataclasses.asdict(memfit.remat.calibrate("cpu"))
    with tempfile.TemporaryDirectory(prefix="remat_compiled_") as tmp:
        # memfit's sources may be edited while the run goes on: the workers import a copy taken now
        snapshot = os.path.join(tmp, "src")
        shutil.copytree(
            Path(__import__("memfit").__file__).parent,
            os.path.join(snapshot, "memfit"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        cache = None if args.warm_cache or args.quick else os.path.join(tmp, "inductor")
        res = run(args.quick, budgets, compile_budgets, procs, steps, cache, snapshot, rates, console)
    wall = time.perf_counter() - t0
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
        "command": shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]]),
        "description": description,
        "quick": args.quick,
        "budgets": budgets,
        "compile_budgets": compile_budgets,
        "procs": procs,
        "steps": steps,
        "memory_steps": MEMORY_STEPS,
        "memory_env": {"MALLOC_MMAP_THRESHOLD_": "65536"},
        "memfit_snapshot": "the workers import src/memfit as copied at the start of the run",
        "inductor_cache": "torch default (warm)" if cache is None else "fresh (compile s cold)",
        "rates": rates,
        "wall_seconds": wall,
        **res,
    }
    if "eager" not in res["configs"] or not _measured(res["configs"]["eager"]):
        raise SystemExit("eager was not measured: nothing to compare against")
    report(console, results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("remat_compiled_quick" if args.quick else "remat_compiled")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / f"{stem}.png")
    console.print(
        f"wall time {wall / 60:.1f} min; raw numbers: {RESULTS / (stem + '.json')}; plot: {stem}.png"
    )


if __name__ == "__main__":
    main()
