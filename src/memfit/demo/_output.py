"""The demo's outputs: a rich table for the terminal, ``report.json``, and one PNG a person can read.

The PNG has four panels: training and validation loss of the runs at the demo's batch over the steps; the
measured peak of one training step as stacked bars by category (every run, with ratios to Adam); and the
equal-memory comparison, validation loss against tokens and against training seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from memfit.memory import format_bytes

__all__ = ["make_table", "plot_report", "write_report"]

# Categories shown in the table and plot. The remat step runs its intermediates outside autograd, so the
# tracker counts them as temporaries, not activations: the demo shows the two together to compare like with like.
_GROUPS: dict[str, tuple[str, ...]] = {
    "parameters": ("parameters", "buffers"),
    "gradients": ("gradients",),
    "optimizer state": ("optimizer_state",),
    "activations + temporaries": ("activations", "temporaries", "inputs"),
}
# categories and runs get colours from two disjoint sets, so no bar reads as a curve
_CATEGORY_COLORS = {
    "parameters": "#bdbdbd",
    "gradients": "#e7ba52",
    "optimizer state": "#8c564b",
    "activations + temporaries": "#9ecae1",
}
_RUN_COLORS = {
    "adam": "#222222",
    "sm3": "#2ca02c",
    "sm3-remat": "#17becf",
    "adafactor": "#d62728",
    "sm3-bf16": "#9467bd",
    "equal": "#ff7f0e",
}


def _grouped(breakdown: dict[str, int]) -> dict[str, int]:
    return {g: sum(breakdown.get(c, 0) for c in cats) for g, cats in _GROUPS.items()}


def _key(r: dict[str, Any]) -> str:
    if r.get("equal_memory"):
        return "equal"
    if r["remat_budget"] is not None:
        return "sm3-remat"
    return str(r.get("optimizer_kind") or r["optimizer"].lower())


def _what(eq: dict[str, Any]) -> str:
    return "SM3 + remat" if eq.get("remat_budget") else "SM3 (remat infeasible at this size)"


def _equal_memory_line(report: dict[str, Any]) -> str:
    eq = report.get("equal_memory")
    if not eq:
        return ""
    run = next(r for r in report["results"] if r.get("equal_memory"))
    return (
        f"; equal memory: limit = the planner's Adam peak at batch {report['config']['batch_size']} "
        f"({format_bytes(eq['limit_bytes'])}; measured {format_bytes(eq['adam_measured_peak_bytes'])}), the planner "
        f"chose batch {eq['batch_size']} for {_what(eq)}: predicted peak {format_bytes(eq['predicted_peak_bytes'])}, "
        f"measured {format_bytes(run['peak_bytes'])}; trained on the same tokens in {run['steps']} steps"
    )


def make_table(report: dict[str, Any]) -> Table:
    """The comparison as a ``rich.table.Table``: memory at the peak by category, time, loss, ratios to Adam."""
    cfg = report["config"]
    results = report["results"]
    table = Table(
        title=f"memfit demo: {cfg['model']} GPT ({report['n_params']:,} parameters), "
        f"{cfg['steps']} steps of {cfg['batch_size']}x{cfg['seq_len']} bytes (the same tokens for every run)",
        caption=f"parameters {format_bytes(results[0]['breakdown'].get('parameters', 0))} in every run; "
        "memory: measured peak of one training step (memfit.memory.track) and its make-up at that instant; "
        "step: median wall time of forward + backward + update" + _equal_memory_line(report),
    )
    cols = ("run", "batch", "peak", "opt state", "act + temp", "step", "tokens/s", "train loss", "val loss")
    for col in cols:
        table.add_column(col, justify="left" if col == "run" else "right")
    for col in ("peak", "opt state", "tokens/s", "val loss"):
        table.add_column(f"{col}\n/ Adam", justify="right")
    for r in results:
        g = _grouped(r["breakdown"])
        ratio = report["ratios"][r["name"]]
        peak = format_bytes(r["peak_bytes"])
        if r.get("planned_peak_bytes"):
            peak += f" (plan {format_bytes(r['planned_peak_bytes'])})"
        table.add_row(
            r["name"],
            str(r.get("batch_size") or cfg["batch_size"]),
            peak,
            format_bytes(g["optimizer state"]),
            format_bytes(g["activations + temporaries"]),
            f"{r['step_seconds'] * 1e3:.1f} ms",
            f"{r['tokens_per_second']:,.0f}",
            f"{r['train_loss']:.3f}",
            f"{r['val_loss']:.3f}",
            f"{ratio['peak']:.2f}x",
            f"{ratio['optimizer_state']:.2%}",
            f"{ratio.get('tokens_per_second', float('nan')):.2f}x",
            f"{ratio['val_loss']:.3f}x",
        )
    return table


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write ``report`` as JSON (atomically: a temporary file, then a rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    tmp.replace(out)
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    out: list[float] = []
    acc = 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _val_xy(r: dict[str, Any], x: str) -> tuple[list[float], list[float]]:
    pts = r.get("val_points") or [{"step": s, "val_loss": v} for s, v in r["val_curve"]]
    return [float(p[x]) for p in pts], [float(p["val_loss"]) for p in pts]


def _plot_losses(ax: Any, report: dict[str, Any]) -> None:
    from matplotlib.lines import Line2D

    batch = report["config"]["batch_size"]
    results = [r for r in report["results"] if not r.get("equal_memory")]
    window = max(1, len(results[0]["losses"]) // 20)
    handles = []
    for r in results:
        key, c = _key(r), _RUN_COLORS[_key(r)]
        steps = list(range(1, len(r["losses"]) + 1))
        vs, vl = _val_xy(r, "step")
        if key == "sm3-remat":
            # the same losses as SM3 (remat changes where values live, not the arithmetic): hollow markers on
            # SM3's line, so both show
            every = max(1, len(steps) // 15)
            ax.plot(
                steps,
                _smooth(r["losses"], window),
                ls="none",
                marker="s",
                ms=6,
                mfc="none",
                mec=c,
                mew=1.4,
                markevery=(every // 2, every),
                zorder=4,
            )
            ax.plot(vs, vl, ls="none", marker="s", ms=9, mfc="none", mec=c, mew=1.6, zorder=4)
            label = f"{r['name']}: same losses as SM3 (hollow squares on its lines)"
            handles.append(Line2D([], [], ls="none", marker="s", mfc="none", mec=c, mew=1.4, label=label))
            continue
        ax.plot(steps, _smooth(r["losses"], window), color=c, lw=1.5, zorder=2)
        ax.plot(vs, vl, color=c, ls="--", marker="o", ms=4, lw=1.0, zorder=3)
        handles.append(Line2D([], [], color=c, lw=1.5, marker="o", ms=4, label=f"{r['name']}"))
    handles.append(
        Line2D([], [], color="grey", lw=1.5, label=f"solid: training loss, moving mean of {window} steps")
    )
    handles.append(
        Line2D([], [], color="grey", ls="--", marker="o", ms=4, lw=1.0, label="dashed: validation loss")
    )
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(f"loss of the runs at batch {batch} (equal-memory run: lower panels)", fontsize=10)
    ax.grid(alpha=0.3)
    lo = min(min(_val_xy(r, "step")[1]) for r in results)
    ax.set_ylim(lo - 0.15, lo + 1.6)


def _wrap(name: str) -> str:
    return (
        name.replace(" + remat, batch", " + remat\nbatch")
        .replace(" (", "\n(")
        .replace(" + momentum", "\n+ momentum")
    )


def _plot_memory(ax: Any, report: dict[str, Any]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    mib = 2.0**20
    results = report["results"]
    names = [_wrap(r["name"]) for r in results]
    bottoms = [0.0] * len(results)
    totals = {g: sum(_grouped(r["breakdown"])[g] for r in results) for g in _GROUPS}
    for group in _GROUPS:
        heights = [_grouped(r["breakdown"])[group] / mib for r in results]
        ax.bar(
            names,
            heights,
            bottom=bottoms,
            color=_CATEGORY_COLORS[group],
            width=0.62,
            edgecolor="white",
            lw=0.5,
        )
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    top = max(bottoms)
    for i, r in enumerate(results):
        ratio = report["ratios"][r["name"]]
        state = _grouped(r["breakdown"])["optimizer state"]
        text = f"{r['peak_bytes'] / mib:.2f} MiB, {ratio['peak']:.2f}x\nstate {format_bytes(state)}"
        text += f" ({ratio['optimizer_state']:.1%})"
        if r.get("planned_peak_bytes"):
            text += f"\nplan said {r['planned_peak_bytes'] / mib:.2f} MiB"
            ax.plot([i - 0.36, i + 0.36], [r["planned_peak_bytes"] / mib] * 2, color="black", ls=":", lw=1.5)
        ax.text(i, bottoms[i] + top * 0.015, text, ha="center", va="bottom", fontsize=7)
    adam = results[0]["peak_bytes"] / mib
    ax.axhline(adam, color=_RUN_COLORS["adam"], ls="--", lw=0.9)
    handles: list[Any] = []
    for group in _GROUPS:
        label = group
        if totals[group] == 0:
            label += " (0 B at every run's peak: it falls before the backward makes them)"
        elif group == "optimizer state":
            label += " (SM3's and Adafactor's: too thin to see, sizes above the bars)"
        handles.append(Patch(color=_CATEGORY_COLORS[group], label=label))
    handles.append(Line2D([], [], color=_RUN_COLORS["adam"], ls="--", lw=0.9, label="Adam's measured peak"))
    if any(r.get("planned_peak_bytes") for r in results):
        handles.append(
            Line2D([], [], color="black", ls=":", lw=1.5, label="equal-memory run: the planner's prediction")
        )
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_ylim(0, top * 1.6)  # room for the legend above the tallest label
    ax.set_ylabel("MiB at the peak of one training step")
    ax.set_title("measured peak memory of one step by category (ratios to Adam)", fontsize=10)
    ax.tick_params(axis="x", labelsize=7)


def _plot_equal(ax_tok: Any, ax_sec: Any, report: dict[str, Any]) -> None:
    from matplotlib.lines import Line2D

    results = report["results"]
    eq_runs = [r for r in results if r.get("equal_memory")]
    shown = [results[0]] + [r for r in results if _key(r) == "sm3-remat"] + eq_runs
    for ax, x, xlabel in (
        (ax_tok, "tokens", "tokens trained on"),
        (ax_sec, "seconds", "training seconds (steps only)"),
    ):
        for r in shown:
            xs, ys = _val_xy(r, x)
            c = _RUN_COLORS[_key(r)]
            ax.plot(
                xs,
                ys,
                color=c,
                marker="o",
                ms=4,
                lw=1.4,
                label=f"{r['name']}, batch {r.get('batch_size', '')}",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats / byte)")
        ax.grid(alpha=0.3)
        lo = min(min(_val_xy(r, x)[1]) for r in shown)
        ax.set_ylim(lo - 0.1, lo + 1.2)
    if not eq_runs:
        ax_tok.set_title("equal memory: not run", fontsize=10)
        return
    eq = report["equal_memory"]
    ax_tok.set_title(
        f"equal memory ({format_bytes(eq['limit_bytes'])}, Adam's predicted peak): validation loss per token",
        fontsize=10,
    )
    ax_sec.set_title("equal memory: validation loss per second of training", fontsize=10)
    ax_tok.legend(fontsize=8, loc="upper right")
    eq_run = eq_runs[0]
    speed = report["ratios"][eq_run["name"]].get("tokens_per_second", float("nan"))
    note = (
        f"The planner (meta tensors, no trial run) chose batch {eq['batch_size']} for {_what(eq)} under Adam's peak;\n"
        f"it trains on the same tokens in fewer, larger steps. Here ({report['machine']['cpu_count']} CPUs, shared) "
        f"its tokens/s were {speed:.2f}x Adam's;\non a GPU a larger batch is usually faster per token still "
        "(not measured here)."
    )
    # below the panel, not on it: no curve runs under the note
    ax_sec.figure.text(0.75, 0.005, note, ha="center", va="bottom", fontsize=8)
    ax_sec.legend(
        handles=[Line2D([], [], color=_RUN_COLORS[_key(r)], marker="o", ms=4) for r in shown],
        labels=[r["name"] for r in shown],
        fontsize=8,
        loc="upper right",
    )


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the four-panel PNG (losses; memory bars; equal memory per token and per second); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    _plot_losses(axes[0][0], report)
    _plot_memory(axes[0][1], report)
    _plot_equal(axes[1][0], axes[1][1], report)
    m = report["machine"]
    fig.suptitle(
        f"memfit demo — {report['config']['model']} GPT, {report['n_params']:,} params — "
        f"{m['date']}, {m['cpu_count']} CPUs, torch {m['torch']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0.0, 0.05, 1.0, 1.0))  # room for the equal-memory note at the bottom
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
