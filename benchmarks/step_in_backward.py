"""What does the optimizer step inside the backward buy? Step peak and step time, against the ordinary loop.

A GPT-2-style model (``memfit.models.GPT``: 6 layers, d=512, 8 heads, vocab 8192, tied embeddings, batch 8x256,
float32) trained one step at a time in eight configurations:

    {ordinary loop, memfit.optim.step_in_backward} x {Adam, SM3} x {eager autograd, memfit.remat budget 0.5}

"ordinary" is ``backward(); optimizer.step(); zero_grad()``; "in backward" activates ``step_in_backward`` for the
step (each parameter updated, its gradient freed, as soon as the gradient is final). ``remat 0.5`` is
``memfit.remat.compile(..., budget=0.5)``: half of the ordinary step's no-recomputation peak beyond inputs, and the
same budget in bytes for the step with the updates inside (a fraction would be of its own, lower, no-remat peak). Every ratio is against the ordinary loop with
the same optimizer and the same backward, measured in the same run.

Memory, in a process whose glibc returns large blocks to the OS (``MALLOC_MMAP_THRESHOLD_``, as
``remat_sweep.py``): the step's peak of live tensors above what is resident before it (parameters, optimizer
state) by ``memfit.memory.track``, with the bytes of gradients at that peak; and, in the same step, the RSS
high-water mark above the RSS before it (``VmHWM`` reset through ``/proc/self/clear_refs``; it includes the
tracker's own bookkeeping, a few MiB). Time: a separate process with
the default allocator, configurations interleaved step by step, the median of per-round ratios (thread CPU time,
one thread).

    python benchmarks/step_in_backward.py            # the run quoted in README / docs/step_in_backward.md
    python benchmarks/step_in_backward.py --quick    # GPT 2x128, batch 4x64: a smoke run
    python benchmarks/step_in_backward.py --clip     # the cost of each clipping mode (GPT 4x256, batch 8x128, Adam)
    python benchmarks/step_in_backward.py --plans    # the remat solver's view: peaks and least memory, both ways

``--clip`` compares, with Adam and against ``clip_grad_norm_`` in the ordinary loop: ``step_in_backward`` without
clipping, ``clip_mode="two_pass"`` through ``handle.backward(loss)`` (autograd only: the graph is retained for the
second backward) and through ``handle.run(closure)`` (forward and backward twice), and ``clip_mode="previous"``.
"""

from __future__ import annotations

import argparse
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

RESULTS = Path(__file__).parent / "results"


def configs(budget: float) -> list[tuple[str, str, str]]:
    return [
        (opt, backward, mode)
        for opt in ("adam", "sm3")
        for backward in ("autograd", f"remat{budget:g}")
        for mode in ("ordinary", "in_backward")
    ]


MIB = 2.0**20


def _name(opt: str, backward: str, mode: str) -> str:
    return f"{opt}/{backward}/{mode}"


BATCH = "8x256"  # --batch (main process and workers)
BUDGET = 0.5  # --budget


def build(quick: bool) -> tuple[Any, Any, Any]:
    from memfit.models._gpt import GPTConfig, lm_loss

    if quick:
        cfg = GPTConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=1024, block_size=64)
        shape = (4, 64)
    else:
        cfg = GPTConfig(n_layer=6, n_head=8, n_embd=512, vocab_size=8192, block_size=256)
        b, t = (int(v) for v in BATCH.split("x"))
        shape = (b, t)
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, cfg.vocab_size, shape, generator=g),
        torch.randint(0, cfg.vocab_size, shape, generator=g),
    )
    return cfg, batch, lm_loss


def make_steps(quick: bool) -> tuple[dict[str, Callable[[], None]], dict[str, Any], Any]:
    """One callable per configuration (one model, optimizer and remat step per optimizer), and facts."""
    import memfit.remat
    from memfit.models._gpt import GPT
    from memfit.optim import SM3, step_in_backward

    cfg, batch, lm_loss = build(quick)
    steps: dict[str, Callable[[], None]] = {}
    facts: dict[str, Any] = {}
    models = {}
    for opt_name in ("adam", "sm3"):
        torch.manual_seed(0)
        model = GPT(cfg)
        models[opt_name] = model
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(model.parameters(), lr=1e-4)
            if opt_name == "adam"
            else SM3(model.parameters(), lr=1e-2)
        )
        remat = memfit.remat.compile(model, lm_loss, batch, budget=BUDGET)
        facts[_name(opt_name, f"remat{BUDGET:g}", "ordinary")] = {"plan": remat.plan.to_dict()}
        # the same budget in bytes: a fraction would be of the in-backward step's own (lower) no-remat peak
        budget_bytes = remat.plan.budget_bytes
        assert budget_bytes is not None
        remat_ib = remat.with_budget(budget_bytes)
        handle = step_in_backward(opt)
        remat_ib.prepare(batch)  # the schedule with the gradients consumed inside it
        facts[_name(opt_name, f"remat{BUDGET:g}", "in_backward")] = {"plan": remat_ib.plan.to_dict()}
        handle.remove()
        for backward in ("autograd", f"remat{BUDGET:g}"):
            for mode in ("ordinary", "in_backward"):

                def step(
                    model: Any = model,
                    opt: Any = opt,
                    remat: Any = remat_ib if mode == "in_backward" else remat,
                    backward: str = backward,
                    mode: str = mode,
                ) -> None:
                    h = step_in_backward(opt) if mode == "in_backward" else None
                    try:
                        if backward == "autograd":
                            lm_loss(model, batch).backward()
                        else:
                            remat(batch)
                        opt.step()  # a no-op for the parameters already updated in the backward
                        opt.zero_grad(set_to_none=True)
                    finally:
                        if h is not None:
                            h.remove()

                steps[_name(opt_name, backward, mode)] = step
    grad_bytes = sum(p.numel() * p.element_size() for p in models["adam"].parameters())
    facts["_model"] = {
        "params": sum(p.numel() for p in models["adam"].parameters()),
        "grad_bytes": grad_bytes,
        "batch": list(batch[0].shape),
        "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")},
    }
    return steps, facts, models


CLIP_MODES = ["ordinary+clip", "in_backward", "two_pass/backward", "two_pass/run", "previous"]


def make_clip_steps(quick: bool) -> tuple[dict[str, Callable[[], None]], dict[str, Any], Any]:
    """Adam, {autograd, remat 0.5} x the clipping modes (max norm 1.0; a fresh model is clipped on every step)."""
    import memfit.remat
    from memfit.models._gpt import GPT, GPTConfig, lm_loss
    from memfit.optim import step_in_backward

    if quick:
        cfg, shape = GPTConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=1024, block_size=64), (4, 64)
    else:
        cfg, shape = GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=4096, block_size=128), (8, 128)
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, cfg.vocab_size, shape, generator=g),
        torch.randint(0, cfg.vocab_size, shape, generator=g),
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    remat = memfit.remat.compile(model, lm_loss, batch, budget=0.5)
    handle = step_in_backward(opt)
    remat.prepare(batch)
    handle.remove()
    steps: dict[str, Callable[[], None]] = {}
    for backward in ("autograd", "remat0.5"):
        for mode in CLIP_MODES:
            if mode == "two_pass/backward" and backward != "autograd":
                continue

            def step(backward: str = backward, mode: str = mode) -> None:
                def fb() -> None:
                    if backward == "autograd":
                        lm_loss(model, batch).backward()
                    else:
                        remat(batch)

                if mode == "ordinary+clip":
                    fb()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return
                clip = None if mode == "in_backward" else 1.0
                h = step_in_backward(
                    opt, clip_grad_norm=clip, clip_mode="previous" if mode == "previous" else "two_pass"
                )
                try:
                    if mode == "two_pass/backward":
                        h.backward(lm_loss(model, batch))
                    elif clip is None:
                        fb()
                    else:
                        h.run(fb)
                finally:
                    h.remove()

            steps[_name("adam", backward, mode)] = step
    facts = {
        "_model": {
            "params": sum(p.numel() for p in model.parameters()),
            "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "batch": list(shape),
            "config": {
                k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
            },
        }
    }
    return steps, facts, {"adam": model}


def plans(quick: bool) -> dict[str, Any]:
    """The solver's predictions for the main model, with the gradients held to the end vs consumed in the schedule:
    the no-remat peak, the least memory any schedule reaches, and the predicted peak and compute at budgets."""
    import memfit.remat
    from memfit.models._gpt import GPT
    from memfit.optim import step_in_backward

    cfg, batch, lm_loss = build(quick)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = memfit.remat.compile(model, lm_loss, batch, budget=None)
    out: dict[str, Any] = {"grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    for mode in ("ordinary", "in_backward"):
        handle = step_in_backward(opt) if mode == "in_backward" else None
        base = step.with_budget(None)
        base.prepare(batch)
        noremat = base.plan.peak_bytes
        try:
            step.with_budget(1).prepare(batch)
            least = 1
        except memfit.remat.InfeasibleBudget as exc:
            least = exc.min_peak
        row: dict[str, Any] = {"noremat_peak_bytes": noremat, "least_peak_bytes": least}
        for b in (0.5, 0.3):
            try:
                s = step.with_budget(b)
                s.prepare(batch)
                row[f"budget{b}"] = {"peak_bytes": s.plan.peak_bytes, "cost_overhead": s.plan.cost_overhead}
            except memfit.remat.InfeasibleBudget:
                row[f"budget{b}"] = None
        out[mode] = row
        if handle is not None:
            handle.remove()
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker_memory(quick: bool, clip: bool = False) -> dict[str, Any]:
    from memfit.memory import track

    steps, facts, models = (make_clip_steps if clip else make_steps)(quick)
    out: dict[str, Any] = {"_model": facts.pop("_model")}
    warm: set[str] = set()
    for name, fn in steps.items():
        opt_name = name.split("/")[0]
        if opt_name not in warm:  # the optimizer's state, first-call allocations
            fn()
            warm.add(opt_name)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        with track(models[opt_name]) as t:  # one step measured both ways (the machine is shared and slow)
            fn()
        rss = (_rss_kib("VmHWM") - before) * 1024
        rep = t.report
        out[name] = {
            "tracked_peak_bytes": rep.peak_bytes,
            "grad_bytes_at_peak": rep.peak_breakdown.get("gradients", 0),
            "peak_breakdown": dict(rep.peak_breakdown),
            "rss_peak_bytes": rss,
            **facts.get(name, {}),
        }
    return out


def worker_time(quick: bool, rounds: int, clip: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    steps, _, _ = (make_clip_steps if clip else make_steps)(quick)
    for fn in steps.values():
        fn()  # warm-up
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    wall: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(rounds):
        for (
            name,
            fn,
        ) in steps.items():  # interleaved: drift on a shared machine hits every configuration alike
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {"cpu_s": cpu, "wall_s": wall}


def _spawn(args: list[str], env: dict[str, str]) -> Any:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, Any]) -> list[str]:
    if results.get("clip"):
        return report_clip(results)
    mem, tim = results["memory"], results["time"]
    grad_bytes = mem["_model"]["grad_bytes"]
    lines = [
        f"GPT {mem['_model']['config']} batch {mem['_model']['batch']}, "
        f"{mem['_model']['params'] / 1e6:.1f} M parameters, gradients {grad_bytes / MIB:.1f} MiB",
        f"{'configuration':34} {'step peak (tracker)':>22} {'RSS step peak':>20} {'grads at peak':>14} "
        f"{'time (median ratio)':>20}",
    ]
    checks = []
    for opt, backward, mode in configs(results.get("budget", 0.5)):
        name, base = _name(opt, backward, mode), _name(opt, backward, "ordinary")
        m, b = mem[name], mem[base]
        ratios = [c / c0 for c, c0 in zip(tim["cpu_s"][name], tim["cpu_s"][base], strict=True)]
        t_ratio = statistics.median(ratios)
        lines.append(
            f"{name:34} {m['tracked_peak_bytes'] / MIB:9.1f} MiB x{m['tracked_peak_bytes'] / b['tracked_peak_bytes']:.3f}"
            f" {m['rss_peak_bytes'] / MIB:8.1f} MiB x{m['rss_peak_bytes'] / max(b['rss_peak_bytes'], 1):.3f}"
            f" {m['grad_bytes_at_peak'] / MIB:9.1f} MiB"
            f" {statistics.median(tim['cpu_s'][name]):8.2f} s x{t_ratio:.3f}"
        )
        if mode == "in_backward":
            saved = b["tracked_peak_bytes"] - m["tracked_peak_bytes"]
            at_peak = b["grad_bytes_at_peak"]
            ok_mem = at_peak == 0 or saved >= 0.6 * at_peak
            checks.append(
                f"{opt}/{backward}: peak falls by {saved / MIB:.1f} MiB = {saved / grad_bytes:.0%} of all gradients, "
                f"{saved / at_peak:.0%} of the {at_peak / MIB:.1f} MiB of gradients at the ordinary peak "
                f"(target >= 60%): {'PASS' if ok_mem else 'FAIL'}; time x{t_ratio:.3f} (target <= 1.05): "
                f"{'PASS' if t_ratio <= 1.05 else 'FAIL'}"
                if at_peak
                else f"{opt}/{backward}: no gradient at the ordinary peak; peak x"
                f"{m['tracked_peak_bytes'] / b['tracked_peak_bytes']:.3f}, time x{t_ratio:.3f}"
            )
    return [*lines, "", *checks]


def report_clip(results: dict[str, Any]) -> list[str]:
    mem, tim = results["memory"], results["time"]
    lines = [
        f"clipping modes, Adam, max norm 1.0: GPT {mem['_model']['config']} batch {mem['_model']['batch']}, "
        f"gradients {mem['_model']['grad_bytes'] / MIB:.1f} MiB; ratios against clip_grad_norm_ in the ordinary loop",
        f"{'configuration':34} {'step peak (tracker)':>22} {'time (median ratio)':>22}",
    ]
    for name in tim["cpu_s"]:
        base = "/".join(name.split("/")[:2]) + "/ordinary+clip"
        m, b = mem[name], mem[base]
        t_ratio = statistics.median(
            c / c0 for c, c0 in zip(tim["cpu_s"][name], tim["cpu_s"][base], strict=True)
        )
        lines.append(
            f"{name:34} {m['tracked_peak_bytes'] / MIB:9.1f} MiB x{m['tracked_peak_bytes'] / b['tracked_peak_bytes']:.3f}"
            f" {statistics.median(tim['cpu_s'][name]):8.2f} s x{t_ratio:.3f}"
        )
    return lines


def _tag(args: Any) -> str:
    return ("_quick" if args.quick else "") + ("" if args.batch == "8x256" else f"_{args.batch}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="GPT 2x128, batch 4x64: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 2 with --quick)")
    parser.add_argument("--clip", action="store_true", help="the cost of each clipping mode")
    parser.add_argument("--plans", action="store_true", help="the remat solver's predictions, both ways")
    parser.add_argument("--batch", default="8x256", help="BxT of the main model (default 8x256)")
    parser.add_argument("--budget", type=float, default=0.5, help="the remat budget (default 0.5)")
    parser.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help="print the report of a result file")
    args = parser.parse_args()
    global BATCH, BUDGET
    BATCH, BUDGET = args.batch, args.budget
    rounds = args.rounds or (2 if args.quick else 3)
    if args.worker == "memory":
        print(json.dumps(worker_memory(args.quick, args.clip)))
        return
    if args.worker == "time":
        print(json.dumps(worker_time(args.quick, rounds, args.clip)))
        return
    if args.plans:
        res = plans(args.quick)
        g = res["grad_bytes"]
        for mode in ("ordinary", "in_backward"):
            r = res[mode]
            cells = ", ".join(
                f"{b}: {r[b]['peak_bytes'] / MIB:.1f} MiB at x{r[b]['cost_overhead']:.3f}"
                if r[b]
                else f"{b}: infeasible"
                for b in ("budget0.5", "budget0.3")
            )
            print(
                f"{mode:12} no remat {r['noremat_peak_bytes'] / MIB:.1f} MiB, least {r['least_peak_bytes'] / MIB:.1f} MiB "
                f"(gradients {g / MIB:.1f} MiB); {cells}"
            )
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"step_in_backward_plans{_tag(args)}.json"
        out.write_text(
            json.dumps(
                {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **res},
                indent=1,
            )
        )
        print(f"wrote {out}")
        return
    if args.report:
        print("\n".join(report(json.loads(args.report.read_text()))))
        return
    flags = [
        *(["--quick"] if args.quick else []),
        *(["--clip"] if args.clip else []),
        *["--batch", args.batch, "--budget", str(args.budget)],
    ]
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "note": "shared machine: other work ran beside it",
        "quick": args.quick,
        "clip": args.clip,
        "batch": args.batch,
        "budget": args.budget,
        "rounds": rounds,
    }
    results["memory"] = _spawn(["--worker", "memory", *flags], {"MALLOC_MMAP_THRESHOLD_": "65536"})
    results["time"] = _spawn(["--worker", "time", "--rounds", str(rounds), *flags], {})
    results["seconds"] = time.perf_counter() - t0
    text = report(results)
    print("\n".join(text))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"step_in_backward{'_clip' if args.clip else ''}{_tag(args)}.json"
    out.write_text(json.dumps({**results, "report": text}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
