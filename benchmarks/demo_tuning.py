"""Which learning rate does each of the demo's optimizers get? The same tuning budget for every one.

Question: at the demo's size (``mini`` GPT, 300 steps of 8x64 bytes, quadratic warm-up of 100 steps), which
learning rate of a fixed 3-point grid gives each optimizer its lowest loss, and how close does each SM3 variant
come to Adam? Every configuration gets the same budget: 3 learning rates x 3 seeds (weights and batches).

The choice is made on a **tuning split carved from the training data** (the last 10% of the demo's training
tokens; the runs here train on the other 90%), so the validation split the demo reports is never looked at.
The equal-memory configuration (SM3 at the batch the planner picks for SM3 + remat under Adam's memory, trained on
the same number of tokens, warm-up over the same number of tokens) is tuned the same way; it runs without remat
here, since remat changes the memory of a step, not its arithmetic (``tests/demo`` checks the losses agree).

Baseline: Adam at its best learning rate; the table gives every configuration's tuning loss (mean of 3 seeds)
and its ratio to that baseline, seed by seed paired.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_tuning.py`` (one thread; ~45 runs of ~30 s each on an
idle core; ``--quick`` for a smoke run). Writes ``benchmarks/results/demo_tuning.json`` after every run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from memfit.data import TextDataset
from memfit.demo import DemoConfig, build_optimizer, plan_equal_memory
from memfit.models import get_model
from memfit.optim import sm3_warmup_schedule

RESULTS = Path(__file__).resolve().parent / "results" / "demo_tuning.json"

# the grid: 3 learning rates per optimizer, a factor of 2 apart, centred on the previous tuning (docs/demo.md);
# SM3 with momentum averages its updates, which usually tolerates a larger step: its grid is one step higher
GRID: dict[str, tuple[float, ...]] = {
    "adam": (1e-3, 2e-3, 4e-3),
    "sm3": (5e-3, 1e-2, 2e-2),
    "sm3-bf16": (1e-2, 2e-2, 4e-2),
    "adafactor": (5e-3, 1e-2, 2e-2),
    "sm3-equal-memory": (5e-3, 1e-2, 2e-2),
}
# the first pass (2026-12-02) found SM3, SM3 + momentum and Adafactor best at the top of their grids: one more
# point above each grid, for every configuration alike (4 x 3 seeds each), run as a second pass (--extend)
EXTEND: dict[str, tuple[float, ...]] = {
    "adam": (8e-3,),
    "sm3": (4e-2,),
    "sm3-bf16": (8e-2,),
    "adafactor": (4e-2,),
    "sm3-equal-memory": (4e-2,),
}
SEEDS = (0, 1, 2)
TUNE_FRACTION = 0.1  # of the training tokens
EVAL_BATCHES = 16


def tuning_split(ds: TextDataset) -> TextDataset:
    """Train on the first 90% of the training tokens, evaluate on the last 10%; the validation split is unused."""
    n = int(len(ds.train) * (1 - TUNE_FRACTION))
    return TextDataset(path=ds.path, train=ds.train[:n], val=ds.train[n:])


def train_once(
    kind: str,
    lr: float,
    seed: int,
    ds: TextDataset,
    *,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    spec = get_model(DemoConfig().model)
    torch.manual_seed(seed)
    model = spec.build()
    opt = build_optimizer(kind, model.parameters(), lr)
    sched = sm3_warmup_schedule(opt, warmup_steps=warmup)
    t0 = time.perf_counter()
    for k in range(steps):
        loss = spec.loss_fn(model, ds.batch("train", k, batch_size, seq_len, seed=seed))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if not math.isfinite(float(loss.detach())):
            return {"loss": math.inf, "diverged_at": k + 1, "seconds": time.perf_counter() - t0}
    with torch.no_grad():
        # the same tuning batches for every configuration (seed 0), at the demo's evaluation batch size
        losses = [
            float(spec.loss_fn(model, ds.batch("val", i, 8, seq_len, seed=0))) for i in range(EVAL_BATCHES)
        ]
    return {"loss": sum(losses) / len(losses), "seconds": time.perf_counter() - t0}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration and learning rate: mean loss over seeds; per configuration: the best learning rate."""
    by: dict[str, dict[float, dict[int, float]]] = {}
    for r in runs:
        by.setdefault(r["config"], {}).setdefault(r["lr"], {})[r["seed"]] = r["loss"]
    best: dict[str, dict[str, Any]] = {}
    for cfg, lrs in by.items():
        full = {lr: seeds for lr, seeds in lrs.items() if len(seeds) == len(SEEDS)}
        if not full:
            continue
        lr = min(full, key=lambda x: statistics.fmean(full[x].values()))
        best[cfg] = {"lr": lr, "mean_loss": statistics.fmean(full[lr].values()), "by_seed": full[lr]}
    out: dict[str, Any] = {
        "best": best,
        "grid_means": {
            c: {str(lr): statistics.fmean(s.values()) for lr, s in v.items()} for c, v in by.items()
        },
    }
    if "adam" in best:
        base = best["adam"]["by_seed"]
        for b in best.values():
            ratios = [b["by_seed"][s] / base[s] for s in SEEDS if s in base and s in b["by_seed"]]
            b["ratio_to_adam_by_seed"] = ratios
            b["ratio_to_adam"] = b["mean_loss"] / best["adam"]["mean_loss"]
    return out


def _plan_with_retry(cfg: DemoConfig, tries: int = 80) -> Any:
    """The planner's equal-memory batch; retried while ``memfit.plan`` is being edited in the same checkout."""
    for i in range(tries):
        try:
            return plan_equal_memory(cfg.model, cfg.batch_size, cfg.seq_len, remat_budget=cfg.remat_budget)
        except (ImportError, AttributeError) as exc:
            if i == tries - 1:
                raise
            print(f"planner not importable ({exc}); retrying in 30 s", flush=True)
            time.sleep(30)
    raise AssertionError("unreachable")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 steps, one seed")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--extend", action="store_true", help="run only the points of EXTEND (the second pass)")
    ap.add_argument(
        "--seeds", type=int, nargs="+", help="run only these of SEEDS (passes in parallel; --merge)"
    )
    ap.add_argument(
        "--configs", nargs="+", help="run only these configurations of the grid (parallel passes)"
    )
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the others")
    ap.add_argument("--merge", type=Path, nargs="+", help="combine the runs of these result files into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    torch.set_num_threads(1)
    cfg = DemoConfig()
    steps, seeds = (12, SEEDS[:1]) if args.quick else (cfg.steps, tuple(args.seeds or SEEDS))
    warmup = max(1, steps // 3) if args.quick else cfg.warmup_steps
    ds = tuning_split(TextDataset.from_file(cfg.data))
    t_start, c_start = time.perf_counter(), time.process_time()
    shapes = {c: (cfg.batch_size, steps, warmup) for c in GRID}
    eq: Any = None  # the planner's choice, made when the equal-memory configuration first runs
    runs: list[dict[str, Any]] = []
    before = {"wall_seconds": 0.0, "cpu_seconds": 0.0}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        runs, before = old["runs"], {k: old[k] for k in before}
    done = {(r["config"], r["lr"], r["seed"]) for r in runs}
    grid = EXTEND if args.extend else GRID
    header: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, 1 thread, "
        "other work running beside it",
        "model": cfg.model,
        "seq_len": cfg.seq_len,
        "grid": {c: list(v) for c, v in grid.items()},
        "seeds": list(seeds),
        "tuning_split": f"last {TUNE_FRACTION:.0%} of the training tokens; trained on the rest; val split unused",
    }
    for seed in seeds:  # seeds outermost: a partial file already compares every configuration
        for config, lrs in grid.items():
            if args.configs and config not in args.configs:
                continue
            kind = "sm3" if config == "sm3-equal-memory" else config
            if config == "sm3-equal-memory" and eq is None:
                eq = _plan_with_retry(cfg)
                shapes[config] = (
                    eq.batch_size,
                    max(1, round(steps * cfg.batch_size / eq.batch_size)),  # the same number of tokens
                    max(1, round(warmup * cfg.batch_size / eq.batch_size)),  # warm-up over the same tokens
                )
                header["equal_memory_plan"] = eq.to_dict()
            b, s, w = shapes[config]
            for lr in lrs:
                if (config, lr, seed) in done:
                    continue
                r = train_once(kind, lr, seed, ds, batch_size=b, seq_len=cfg.seq_len, steps=s, warmup=w)
                runs.append({"config": config, "lr": lr, "seed": seed, **r})
                print(
                    f"{config:>17} lr {lr:<7g} seed {seed}: {r['loss']:.4f} ({r['seconds']:.0f} s)",
                    flush=True,
                )
                summary = summarize(runs)
                out = {
                    **header,
                    "shapes": {
                        c: {"batch_size": b, "steps": s, "warmup_steps": w} for c, (b, s, w) in shapes.items()
                    },
                    "wall_seconds": before["wall_seconds"] + time.perf_counter() - t_start,
                    "cpu_seconds": before["cpu_seconds"] + time.process_time() - c_start,
                    "runs": runs,
                    **summary,
                }
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(out, indent=2) + "\n")
    print_table(summarize(runs))
    print(
        f"wall {time.perf_counter() - t_start:.0f} s, process CPU {time.process_time() - c_start:.0f} s -> {args.out}"
    )


def merge(paths: list[Path], out: Path) -> None:
    """One result file from several passes: every run, the summary over all of them, each pass's header."""
    parts = [json.loads(p.read_text()) for p in paths]
    runs: list[dict[str, Any]] = []
    seen: set[tuple[str, float, int]] = set()
    for part in parts:  # a run two passes both made counts once (the first file's)
        for r in part["runs"]:
            if (r["config"], r["lr"], r["seed"]) not in seen:
                seen.add((r["config"], r["lr"], r["seed"]))
                runs.append(r)
    grid: dict[str, list[float]] = {}
    for part in parts:
        for c, lrs in part["grid"].items():
            grid.setdefault(c, []).extend(lrs)
    merged = {
        **{k: v for k, v in parts[0].items() if k not in ("runs", "best", "grid_means")},
        "grid": {c: sorted(set(v)) for c, v in grid.items()},
        "passes": [
            {k: p[k] for k in ("date", "wall_seconds", "cpu_seconds", "grid", "shapes") if k in p}
            for p in parts
        ],
        "wall_seconds": sum(p["wall_seconds"] for p in parts),
        "cpu_seconds": sum(p["cpu_seconds"] for p in parts),
        "runs": runs,
        **summarize(runs),
    }
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print_table(merged)
    print(
        f"{len(runs)} runs, wall {merged['wall_seconds']:.0f} s, process CPU {merged['cpu_seconds']:.0f} s -> {out}"
    )


def print_table(summary: dict[str, Any]) -> None:
    print(f"\n{'configuration':>17}  {'lr':>7}  {'loss (mean)':>11}  {'/ Adam':>7}  per seed")
    for config, b in summary["best"].items():
        per = " ".join(f"{x:.3f}" for x in b.get("ratio_to_adam_by_seed", []))
        print(
            f"{config:>17}  {b['lr']:>7g}  {b['mean_loss']:>11.4f}  {b.get('ratio_to_adam', math.nan):>6.3f}x  {per}"
        )


if __name__ == "__main__":
    main()
