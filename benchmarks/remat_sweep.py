"""What does rematerialization buy end to end? Peak memory and step time of a training step, side by side.

For a GPT-2 (HF transformers, built from a config) and a ResNet-style CNN, sweeps memory budgets and compares,
in one run:

- eager autograd, no recomputation (the baseline every ratio is against);
- memfit (``memfit.remat.compile``) with the ``budget``, ``twremat`` and ``checkpoint`` solvers at budgets
  1.0 .. 0.2 of the no-remat activation peak, and with no budget (the machinery's own overhead);
- per-block ``torch.utils.checkpoint`` (non-reentrant);
- ``torch.compile`` (inductor) with ``activation_memory_budget`` (``--compile``; it takes minutes on a CPU).

Memory is measured twice, in a process whose glibc returns large blocks to the OS (``MALLOC_MMAP_THRESHOLD_``), so
that the process RSS follows live tensors: memfit's live-tensor accounting (``memfit.memory.track``) and the RSS
high-water mark of the step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Time is measured in
separate processes with the default allocator (forcing mmap slows allocation), configurations interleaved step
by step, median over steps and processes.

    python benchmarks/remat_sweep.py            # GPT-2 6x512, batch 8x256; CNN 32 channels x 8 blocks
    python benchmarks/remat_sweep.py --quick    # small shapes, a smoke run
    python benchmarks/remat_sweep.py --compile  # add torch.compile + activation_memory_budget

Writes ``benchmarks/results/remat_sweep.json`` and the Pareto plot ``benchmarks/results/remat_sweep.png``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import _table

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (1.0, 0.7, 0.5, 0.3, 0.2)
METHODS = ("budget", "twremat", "checkpoint")
COMPILE_BUDGETS = (1.0, 0.5, 0.2)


# ---------------------------------------------------------------------------------------------- models
class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self, c: int, blocks: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(ResBlock(c) for _ in range(blocks))
        self.head = nn.Linear(c, classes)
        self.checkpoint_blocks = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            if self.checkpoint_blocks:
                h = torch.utils.checkpoint.checkpoint(b, h, use_reentrant=False)
            else:
                h = b(h)
        return self.head(h.mean(dim=(2, 3)))


def build(name: str, quick: bool) -> tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], Any, str]:
    torch.manual_seed(0)
    if name == "gpt2":
        import transformers

        layers, d, vocab, b, t = (2, 128, 1024, 4, 64) if quick else (6, 512, 8192, 8, 256)
        cfg = transformers.GPT2Config(
            n_layer=layers, n_embd=d, n_head=8, vocab_size=vocab, n_positions=t,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        cfg._attn_implementation = "eager"
        model = transformers.GPT2LMHeadModel(cfg)
        model.loss_type = "ForCausalLM"  # HF's default loss lookup breaks the graph
        ids = torch.randint(0, vocab, (b, t))

        def lm_loss(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
            return m(input_ids=batch, labels=batch).loss

        return model, lm_loss, ids, f"GPT-2 {layers}x{d}, vocab {vocab}, batch {b}x{t}"
    c, blocks, b, size = (8, 3, 4, 16) if quick else (32, 8, 32, 32)
    model = ResNet(c, blocks)
    x, y = torch.randn(b, 3, size, size), torch.randint(0, 10, (b,))

    def xent(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    return model, xent, (x, y), f"ResNet {blocks} blocks x {c} ch, batch {b}x3x{size}x{size}"


def fresh_function(fn: Callable[[Any], Any], tag: str) -> Callable[[Any], Any]:
    """``fn`` with a code object of its own.

    Dynamo caches compiled graphs on the code object of the frame: two ``torch.compile`` of functions sharing
    one code object (a lambda made in a loop) share that cache, so the second would silently run the first's
    graph, whatever its backend settings or ``activation_memory_budget``.
    """
    code = fn.__code__.replace(co_name=f"step_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def set_block_checkpointing(model: nn.Module, on: bool) -> None:
    if isinstance(model, ResNet):
        model.checkpoint_blocks = on
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


# ---------------------------------------------------------------------------------------------- configs
def make_steps(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Any,
    *,
    with_compile: bool,
    quick: bool,
    only: str | None = None,
) -> tuple[dict[str, Callable[[], Any]], dict[str, dict[str, Any]]]:
    """name -> a function running one forward+backward; name -> facts about the configuration."""
    import re

    import memfit.remat

    def want(name: str) -> bool:
        return name == "eager" or only is None or re.search(only, name) is not None

    steps: dict[str, Callable[[], Any]] = {}
    info: dict[str, dict[str, Any]] = {}

    def eager() -> Any:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    if with_compile:
        # per-block checkpointing on a copy of its own, switched on once: toggling it on the shared model re-binds
        # module attributes dynamo guards on, and every compiled configuration would recompile at its next call
        ckpt_model = copy.deepcopy(model)
        set_block_checkpointing(ckpt_model, True)

        def ckpt() -> Any:
            loss = loss_fn(ckpt_model, batch)
            loss.backward()
            for p in ckpt_model.parameters():  # the workers reset the shared model's gradients only
                p.grad = None
            return loss

    else:

        def ckpt() -> Any:
            set_block_checkpointing(model, True)
            try:
                return eager()
            finally:
                set_block_checkpointing(model, False)

    steps["eager"], info["eager"] = eager, {"kind": "eager"}
    if want("ckpt-per-block"):
        steps["ckpt-per-block"], info["ckpt-per-block"] = ckpt, {"kind": "torch.utils.checkpoint"}

    base = memfit.remat.compile(model, loss_fn, batch)
    if want("memfit-none"):
        steps["memfit-none"] = lambda: base(batch)
        info["memfit-none"] = {"kind": "memfit", "method": "noremat", "budget": None, **base.plan.to_dict()}
    for method in METHODS:
        for budget in BUDGETS if not quick else (0.5, 0.3):
            name = f"memfit-{method}-{budget}"
            if not want(name):
                continue
            try:
                step = base.with_budget(budget, method)  # type: ignore[arg-type]
                step.prepare(batch)
            except memfit.remat.InfeasibleBudget as exc:
                info[name] = {
                    "kind": "memfit", "method": method, "budget": budget,
                    "infeasible": f"infeasible: {method} reaches {exc.min_peak / 2**20:.2f} MiB at best",
                }  # fmt: skip
                continue
            steps[name] = (lambda s: lambda: s(batch))(step)
            info[name] = {"kind": "memfit", "method": method, "budget": budget, **step.plan.to_dict()}

    if with_compile:
        import torch._functorch.config as functorch_config

        for budget in COMPILE_BUDGETS:
            name = f"compile-amb-{budget}"
            if not want(name):
                continue
            functorch_config.activation_memory_budget = budget
            # a code object of its own per budget: dynamo caches on it, and a shared lambda would serve every
            # budget the first one's graph
            compiled = torch.compile(
                fresh_function(lambda b: loss_fn(model, b), name.replace("-", "_").replace(".", "_"))
            )
            t0 = time.perf_counter()
            try:
                compiled(batch).backward()  # compile now, under this budget
            except Exception as exc:  # inductor may be unavailable on a machine: say so and go on
                info[name] = {
                    "kind": "torch.compile",
                    "budget": budget,
                    "error": f"{type(exc).__name__}: {exc}",
                }
                continue
            info[name] = {
                "kind": "torch.compile",
                "budget": budget,
                "compile_seconds": time.perf_counter() - t0,
            }
            steps[name] = (lambda f: lambda: f(batch).backward())(compiled)
        functorch_config.activation_memory_budget = 1.0
    return steps, info


# ---------------------------------------------------------------------------------------------- workers
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker_memory(name: str, quick: bool, with_compile: bool, only: str | None) -> dict[str, Any]:
    from memfit.memory import track

    model, loss_fn, batch, _ = build(name, quick)
    steps, info = make_steps(model, loss_fn, batch, with_compile=with_compile, quick=quick, only=only)
    out: dict[str, Any] = {}
    for cfg, fn in steps.items():
        for p in model.parameters():
            p.grad = None
        fn()  # warm-up (first-call allocations, lazy init)
        for p in model.parameters():
            p.grad = None
        accounted = None
        if not cfg.startswith("compile"):
            with track() as t:
                fn()
            accounted = t.report.peak_bytes
            for p in model.parameters():
                p.grad = None
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        fn()
        rss_peak = (_rss_kib("VmHWM") - before) * 1024
        out[cfg] = {"accounted_peak_bytes": accounted, "rss_peak_bytes": rss_peak}
    for cfg, facts in info.items():
        out.setdefault(cfg, {}).update(facts)
    return out


def worker_time(
    name: str, quick: bool, with_compile: bool, steps_per_cfg: int, only: str | None
) -> dict[str, list[float]]:
    model, loss_fn, batch, _ = build(name, quick)
    steps, _ = make_steps(model, loss_fn, batch, with_compile=with_compile, quick=quick, only=only)
    times: dict[str, list[float]] = {cfg: [] for cfg in steps}
    for fn in steps.values():  # warm-up
        for p in model.parameters():
            p.grad = None
        fn()
    for _ in range(steps_per_cfg):
        for cfg, fn in steps.items():  # interleaved: drift on a shared machine hits every configuration alike
            for p in model.parameters():
                p.grad = None
            t0 = time.perf_counter()
            fn()
            times[cfg].append(time.perf_counter() - t0)
    return times


def _spawn(args: list[str], env: dict[str, str]) -> Any:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report
def run(
    models: list[str],
    quick: bool,
    with_compile: bool,
    procs: int,
    steps_per_cfg: int,
    only: str | None = None,
    memory: bool = True,
) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=170)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "quick": quick,
        "only": only,
        "models": {},
    }
    common = ["--quick"] if quick else []
    common += ["--compile"] if with_compile else []
    common += ["--only", only] if only else []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("remat sweep", total=len(models) * (1 + procs))
        for name in models:
            mem: dict[str, Any] = {}
            if memory:
                progress.update(task, description=f"{name}: memory (MALLOC_MMAP_THRESHOLD_=65536)")
                env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
                mem = _spawn(["--worker", "memory", "--model", name, *common], env)
            progress.advance(task)
            times: dict[str, list[float]] = {}
            for i in range(procs):
                progress.update(task, description=f"{name}: time, process {i + 1}/{procs}")
                got = _spawn(
                    ["--worker", "time", "--model", name, "--steps", str(steps_per_cfg), *common], {}
                )
                for cfg, ts in got.items():
                    times.setdefault(cfg, []).extend(ts)
                progress.advance(task)
            for cfg, ts in times.items():
                mem.setdefault(cfg, {})
                mem[cfg]["step_seconds"] = statistics.median(ts)
                mem[cfg]["step_seconds_all"] = ts
            results["models"][name] = {"description": build(name, quick)[3], "configs": mem}
            print_table(console, name, results["models"][name])
    return results


def print_table(console: Any, name: str, res: dict[str, Any]) -> None:
    cfgs = res["configs"]
    eager = cfgs["eager"]
    mib = 2.0**20

    def acc(r: dict[str, Any]) -> Any:
        return r.get("accounted_peak_bytes")

    def rss(r: dict[str, Any]) -> Any:
        return r.get("rss_peak_bytes")

    def note(r: dict[str, Any]) -> str:
        if r.get("kind") == "memfit" and "peak_bytes" in r:
            return f"pred {r['peak_bytes'] / mib:.1f} MiB, pred cost x{r['cost_overhead']:.2f}"
        return ""

    _table.print_table(
        console,
        f"{res['description']} — ratios against eager autograd measured in the same run",
        cfgs,
        [
            ("accounted MiB", lambda r: "-" if acc(r) is None else f"{acc(r) / mib:.1f}"),
            (
                "vs eager",
                lambda r: "-" if acc(r) is None else f"{acc(r) / eager['accounted_peak_bytes']:.2f}",
            ),
            ("RSS MiB", lambda r: "-" if rss(r) is None else f"{rss(r) / mib:.1f}"),
            (
                "vs eager",
                lambda r: "-" if rss(r) is None else f"{rss(r) / max(eager['rss_peak_bytes'], 1):.2f}",
            ),
            ("step s", lambda r: f"{r['step_seconds']:.3f}"),
            ("vs eager", lambda r: f"{r['step_seconds'] / eager['step_seconds']:.2f}"),
        ],
        note=note,
        measured=lambda r: "step_seconds" in r,
        why=lambda r: r.get("infeasible", r.get("error", "")),
        width=70,
    )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    colors = {
        "memfit": "tab:blue",
        "eager": "black",
        "torch.utils.checkpoint": "tab:red",
        "torch.compile": "tab:green",
    }
    markers = {"budget": "o", "twremat": "^", "checkpoint": "s", "noremat": "D"}
    for ax, res in zip(axes[0], models.values(), strict=True):
        cfgs = res["configs"]
        eager = cfgs["eager"]
        for cfg, r in cfgs.items():
            if "step_seconds" not in r or "rss_peak_bytes" not in r:
                continue
            x = r["rss_peak_bytes"] / 2**20
            y = r["step_seconds"] / eager["step_seconds"]
            kind = r.get("kind", "eager")
            ax.scatter(x, y, c=colors.get(kind, "gray"), marker=markers.get(r.get("method", ""), "o"), s=40)
            ax.annotate(
                cfg.replace("memfit-", ""), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel("peak step memory above baseline, RSS (MiB)")
        ax.set_ylabel("step time / eager")
        ax.set_title(res["description"], fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=k) for k, c in colors.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(f"memory vs time ({results['date'][:10]}, {results['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    ap.add_argument("--compile", action="store_true", help="add torch.compile + activation_memory_budget")
    ap.add_argument("--model", choices=("gpt2", "cnn", "all"), default="all")
    ap.add_argument("--procs", type=int, default=3, help="timing processes")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration and process")
    ap.add_argument(
        "--only", default=None, help="regex: run only the configurations it matches (eager always runs)"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the memory process (time only)")
    ap.add_argument("--out", default=None, help="result file stem (default remat_sweep[_quick])")
    ap.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.worker == "memory":
        print(json.dumps(worker_memory(args.model, args.quick, args.compile, args.only)))
        return
    if args.worker == "time":
        print(json.dumps(worker_time(args.model, args.quick, args.compile, args.steps, args.only)))
        return
    models = ["gpt2", "cnn"] if args.model == "all" else [args.model]
    procs, steps = (1, 2) if args.quick else (args.procs, args.steps)
    results = run(models, args.quick, args.compile, procs, steps, args.only, not args.no_memory)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("remat_sweep_quick" if args.quick else "remat_sweep")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / f"{stem}.png")
    print(f"raw numbers: {RESULTS / (stem + '.json')}\nplot: {RESULTS / (stem + '.png')}")


if __name__ == "__main__":
    main()
