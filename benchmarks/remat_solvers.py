"""How much recomputation does each remat solver pay for a memory budget, and how fast does it solve?

For random training-step graphs of 100, 1k, 5k and 20k nodes and budgets 0.3..0.9 of the no-remat
peak, every solver's solve time and cost overhead (cost / no-remat cost), and, on the graphs where
the MILP finishes, the gap to its optimum. Prints a table of ratios; writes raw numbers to
benchmarks/results/remat_solvers.json.

    .venv/bin/python benchmarks/remat_solvers.py            # full (minutes)
    .venv/bin/python benchmarks/remat_solvers.py --quick    # 100 and 1k nodes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memfit.remat import InfeasibleBudget, graphs, solve

# forward nodes per size: training_step(n) has about 2.6 n nodes (forward, loss, grads, weights)
SIZES = {100: 38, 1000: 385, 5000: 1920, 20000: 7700}
FRACS = (0.3, 0.5, 0.7, 0.9)
# layers per size for --family chain: chain(n) has 4 n + 2 nodes (n weights, n layers, loss, 2 n grads)
CHAIN_LAYERS = {100: 25, 1000: 250, 5000: 1250, 20000: 5000}
METHODS = ("checkpoint", "twremat", "dtr", "budget")


def run_one(g, budget, method, **opts):
    t0 = time.perf_counter()
    try:
        s = solve(g, budget, method=method, **opts)
    except InfeasibleBudget as e:
        return {"ok": False, "time_s": time.perf_counter() - t0, "min_peak": e.min_peak}
    except TimeoutError:
        return {"ok": False, "time_s": time.perf_counter() - t0, "timeout": True}
    sim = s.simulate()
    return {"ok": True, "time_s": time.perf_counter() - t0, "cost": sim.cost, "peak": sim.peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 and 1k nodes only")
    ap.add_argument("--milp-time", type=float, default=60.0, help="MILP time limit (s), 100-node graphs only")
    ap.add_argument(
        "--family", choices=["random", "chain"], default="random", help="random training steps or chains"
    )
    ap.add_argument(
        "--gap", action="store_true", help="only the budget-vs-MILP gap study on graphs of <= 40 nodes"
    )
    ap.add_argument(
        "--reuse-milp",
        action="store_true",
        help="gap study: take the MILP results from the stored remat_solvers_gap.json, re-run budget only",
    )
    ap.add_argument("--exact-nodes", type=int, default=None, help="budget's exact_nodes option (gap study)")
    ap.add_argument(
        "--stage-nodes",
        type=int,
        default=None,
        help="budget's stage_nodes option (gap study; 0: no annealing)",
    )
    ap.add_argument(
        "--exact-gap",
        action="store_true",
        help="only budget (with and without its exact search) against the exact optimum on graphs of 12-30 nodes",
    )
    args = ap.parse_args()
    if args.exact_gap:
        exact_gap_study(seeds=2 if args.quick else 4)
        return
    if args.gap:
        gap_study(
            args.milp_time, reuse=args.reuse_milp, exact_nodes=args.exact_nodes, stage_nodes=args.stage_nodes
        )
        return
    sizes = [100, 1000] if args.quick else list(SIZES)
    rows = []
    console = Console()
    for size in sizes:
        if args.family == "chain":
            g = graphs.chain(CHAIN_LAYERS[size], act_bytes=1 << 20, param_bytes=1 << 12)
        else:
            g = graphs.training_step(
                SIZES[size], seed=size, skip_prob=0.3, max_bytes=16, unit=1 << 16, weight_bytes=1 << 12
            )
        t0 = time.perf_counter()
        nr = solve(g, method="noremat")
        nr_time = time.perf_counter() - t0
        for frac in FRACS:
            budget = int(frac * nr.peak)
            rec = {
                "nodes": len(g),
                "frac": frac,
                "budget": budget,
                "noremat_peak": nr.peak,
                "noremat_cost": nr.cost,
                "noremat_time_s": nr_time,
                "methods": {},
            }
            for m in METHODS:
                if m == "twremat" and size > 1000:
                    continue  # TwRemat's recursion takes minutes from 5k nodes on (see docs/remat.md)
                opts = {"structured": True} if m == "budget" else {}
                rec["methods"][m] = run_one(g, budget, m, **opts)
            if size <= 100:
                rec["methods"]["milp"] = run_one(g, budget, "milp", time_limit=args.milp_time)
            rows.append(rec)
            console.log(f"{len(g)} nodes, budget {frac}: done")
    table = Table(
        title="remat solvers: cost overhead (cost / no-remat cost) and solve time; '-' = no schedule fits"
    )
    table.add_column("nodes", justify="right")
    table.add_column("budget", justify="right")
    for m in [*METHODS, "milp"]:
        table.add_column(f"{m} overhead", justify="right")
        table.add_column(f"{m} s", justify="right")
    table.add_column("budget/milp", justify="right")
    for r in rows:
        cells = [str(r["nodes"]), f"{r['frac']:.1f}"]
        for m in [*METHODS, "milp"]:
            x = r["methods"].get(m)
            if x is None:
                cells += ["", ""]
            elif x["ok"]:
                cells += [f"{x['cost'] / r['noremat_cost']:.3f}", f"{x['time_s']:.2f}"]
            else:
                cells += ["-", f"{x['time_s']:.2f}"]
        b, m = r["methods"]["budget"], r["methods"].get("milp")
        cells.append(f"{b['cost'] / m['cost']:.3f}" if m and m["ok"] and b["ok"] else "")
        table.add_row(*cells)
    console.print(table)
    out = {
        "benchmark": "remat_solvers",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": _torch_version(),
        },
        "quick": args.quick,
        "family": args.family,
        "rows": rows,
    }
    name = "remat_solvers.json" if args.family == "random" else f"remat_solvers_{args.family}.json"
    path = Path(__file__).parent / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    console.print(f"wrote {path}")


def gap_study(
    milp_time: float, *, reuse: bool = False, exact_nodes: int | None = None, stage_nodes: int | None = None
) -> None:
    """budget's cost / MILP's optimum on random training steps of <= 40 nodes, at budgets spread
    between the MILP's smallest feasible peak (0.0) and the no-remat peak (1.0).

    With ``reuse``, the MILP rows (budgets and MILP results) come from the stored JSON, measured by
    an earlier full run with the same graphs; only ``budget`` is re-run.
    """
    import statistics

    from memfit.remat.core.solvers.milp import min_peak_milp

    console = Console()
    recs = []
    opts = {k: v for k, v in (("exact_nodes", exact_nodes), ("stage_nodes", stage_nodes)) if v is not None}
    path = Path(__file__).parent / "results" / "remat_solvers_gap.json"
    if reuse:
        stored = json.loads(path.read_text())
        graphs_by = {}
        for n in (4, 6, 8, 10, 12):
            for seed in range(8):
                g = graphs.training_step(n, seed=seed)
                graphs_by[(len(g), seed)] = g
        for r in stored["rows"]:
            g = graphs_by[(r["nodes"], r["seed"])]
            b = run_one(g, r["budget"], "budget", **opts)
            recs.append(
                {**r, "budget_solver": b, "milp_reused_from": r.get("milp_reused_from", stored["date"])}
            )
    for n in () if reuse else (4, 6, 8, 10, 12):
        for seed in range(8):
            g = graphs.training_step(n, seed=seed)
            if len(g) > 40:
                continue
            nr = solve(g, method="noremat").peak
            try:
                lo = min_peak_milp(g, time_limit=milp_time)
            except TimeoutError:
                continue
            for f in (0.0, 0.25, 0.5, 0.75, 1.0):
                budget = int(lo + f * (nr - lo))
                m = run_one(g, budget, "milp", time_limit=milp_time)
                b = run_one(g, budget, "budget", **opts)
                recs.append(
                    {"nodes": len(g), "seed": seed, "at": f, "budget": budget, "milp": m, "budget_solver": b}
                )
        console.log(f"gap study: n={n} done")
    both = [r for r in recs if r["milp"]["ok"] and r["budget_solver"]["ok"]]
    gaps = [r["budget_solver"]["cost"] / r["milp"]["cost"] for r in both]
    missed = [r for r in recs if r["milp"]["ok"] and not r["budget_solver"]["ok"]]
    summary = {
        "cases": len(recs),
        "both_solved": len(both),
        "median_gap": statistics.median(gaps),
        "worst_gap": max(gaps),
        "within_10pct": sum(x <= 1.10 for x in gaps),
        "budget_infeasible_where_milp_feasible": len(missed),
        "missed_at": sorted({r["at"] for r in missed}),
        "milp_not_finished": sum(not r["milp"]["ok"] for r in recs),
        "budget_time_s_median": statistics.median(r["budget_solver"]["time_s"] for r in recs),
        "budget_time_s_max": max(r["budget_solver"]["time_s"] for r in recs),
        "budget_options": opts,
        "milp_reused": reuse,
    }
    console.print(summary)
    out = {
        "benchmark": "remat_solvers --gap",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": _torch_version()},
        "summary": summary,
        "rows": recs,
    }
    path.write_text(json.dumps(out, indent=1))
    console.print(f"wrote {path}")


def exact_gap_study(seeds: int = 4) -> None:
    """budget against the exact optimum (method="exact", optimal over all schedules) on random training steps
    of 12-30 needed nodes, 20% of forward nodes non-recomputable, at budgets 0, 0.15, 0.4, 0.75 of the way from
    the least peak to the no-remat peak; also budget with exact_nodes=0 (its heuristics alone)."""
    import statistics

    from memfit.remat.core.errors import SearchLimit
    from memfit.remat.core.solvers.exact import exact_min_peak

    rows: list[dict] = []
    graphs_seen = answered = 0
    for n in range(4, 13):
        for seed in range(seeds):
            g = graphs.training_step(n, seed=seed, nonrecomputable_prob=0.2)
            size = len(g.needed())
            if not 12 <= size <= 30:
                continue
            graphs_seen += 1
            t0 = time.perf_counter()
            try:
                lo, _ = exact_min_peak(g, time_limit=60)
            except SearchLimit:
                rows.append({"n": n, "seed": seed, "nodes": size, "exact": "limit"})
                print(f"n={n} seed={seed} ({size} nodes): exact min peak past its limits")
                continue
            answered += 1
            t_min = time.perf_counter() - t0
            nr = solve(g, method="noremat").peak
            for at in (0.0, 0.15, 0.4, 0.75):
                budget = int(lo + at * (nr - lo))
                row: dict = {"n": n, "seed": seed, "nodes": size, "at": at, "budget": budget, "min_peak": lo}
                row["min_peak_time_s"] = t_min
                try:
                    t0 = time.perf_counter()
                    row["exact"] = solve(g, budget, method="exact", time_limit=60).cost
                    row["exact_time_s"] = time.perf_counter() - t0
                except SearchLimit:
                    row["exact"] = "limit"
                for name, opts in (("budget", {}), ("heuristics", {"exact_nodes": 0})):
                    r = run_one(g, budget, "budget", **opts)
                    row[f"{name}_cost"] = r.get("cost") if r["ok"] else None
                    row[f"{name}_time_s"] = r["time_s"]
                rows.append(row)
            print(f"n={n} seed={seed} ({size} nodes): done", flush=True)
    table = Table(title=f"budget / exact optimum, {answered} of {graphs_seen} graphs answered by exact")
    for col in ("solver", "budgets", "median", "worst", "within 10%", "infeasible", "median time (s)"):
        table.add_column(col)
    summary: dict = {"graphs": graphs_seen, "answered": answered}
    for name in ("budget", "heuristics"):
        ok = [r for r in rows if isinstance(r.get("exact"), float)]
        ratios = [
            r[f"{name}_cost"] / r["exact"] for r in ok if r[f"{name}_cost"] is not None and r["exact"] > 0
        ]
        miss = sum(1 for r in ok if r[f"{name}_cost"] is None)
        times = [r[f"{name}_time_s"] for r in ok]
        summary[name] = {
            "budgets": len(ok),
            "median": statistics.median(ratios),
            "worst": max(ratios),
            "within_10pct": sum(x <= 1.10 for x in ratios),
            "infeasible": miss,
            "median_time_s": statistics.median(times),
        }
        table.add_row(
            name if name == "budget" else "budget, exact_nodes=0",
            str(len(ok)),
            f"{statistics.median(ratios):.4f}",
            f"{max(ratios):.4f}",
            str(summary[name]["within_10pct"]),
            str(miss),
            f"{statistics.median(times):.2f}",
        )
    Console().print(table)
    out = Path(__file__).parent / "results" / "remat_solvers_exact_gap.json"
    out.write_text(json.dumps({"summary": summary, "rows": rows, "machine": platform.machine()}, indent=1))
    print(f"wrote {out}")


def _torch_version() -> str:
    # read the installed version without importing torch (the remat core is torch-free)
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return "not installed"


if __name__ == "__main__":
    main()
