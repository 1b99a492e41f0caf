"""The demo's outputs: a rich table for the terminal, ``report.json``, and one PNG a person can read.

The PNG has two panels: training loss (smoothed) and validation loss per configuration over the steps, and the
measured peak of one training step as stacked bars by category, with each bar's ratio to Adam written on it.
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
_COLORS = {
    "parameters": "#4c72b0",
    "gradients": "#dd8452",
    "optimizer state": "#c44e52",
    "activations + temporaries": "#55a868",
}


def _grouped(breakdown: dict[str, int]) -> dict[str, int]:
    return {g: sum(breakdown.get(c, 0) for c in cats) for g, cats in _GROUPS.items()}


def make_table(report: dict[str, Any]) -> Table:
    """The comparison as a ``rich.table.Table``: memory at the peak by category, time, loss, ratios to Adam."""
    cfg = report["config"]
    table = Table(
        title=f"memfit demo: {cfg['model']} GPT ({report['n_params']:,} parameters), "
        f"{cfg['steps']} steps of {cfg['batch_size']}x{cfg['seq_len']} bytes",
        caption=f"parameters {format_bytes(report['results'][0]['breakdown'].get('parameters', 0))} in every run; "
        "memory: measured peak of one training step (memfit.memory.track) and its make-up at that instant "
        "(gradients: none yet at the peak); step: median wall time of forward + backward + update",
    )
    for col in ("run", "peak", "opt state", "act + temp", "step", "tokens/s", "train loss", "val loss"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for col in ("peak", "opt state", "step time", "val loss"):
        table.add_column(f"{col}\n/ Adam", justify="right")
    for r in report["results"]:
        g = _grouped(r["breakdown"])
        ratio = report["ratios"][r["name"]]
        table.add_row(
            r["name"],
            format_bytes(r["peak_bytes"]),
            format_bytes(g["optimizer state"]),
            format_bytes(g["activations + temporaries"]),
            f"{r['step_seconds'] * 1e3:.1f} ms",
            f"{r['tokens_per_second']:,.0f}",
            f"{r['train_loss']:.3f}",
            f"{r['val_loss']:.3f}",
            f"{ratio['peak']:.2f}x",
            f"{ratio['optimizer_state']:.2%}",
            f"{ratio['step_time']:.2f}x",
            f"{ratio['val_loss']:.2f}x",
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


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the two-panel PNG (loss curves; stacked memory bars) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    window = max(1, len(results[0]["losses"]) // 20)
    for i, r in enumerate(results):
        c = colors[i % len(colors)]
        steps = range(1, len(r["losses"]) + 1)
        # a remat run computes the same losses as its twin without remat: draw it dotted and on top, so both show
        remat = r["remat_budget"] is not None
        ax_loss.plot(
            steps,
            _smooth(r["losses"], window),
            color=c,
            lw=2.2 if remat else 1.6,
            ls=":" if remat else "-",
            zorder=3 if remat else 2,
            label=f"{r['name']} (train)",
        )
        vs, vl = zip(*r["val_curve"], strict=True)
        marker = "s" if remat else "o"
        ax_loss.plot(vs, vl, color=c, ls="--", marker=marker, ms=4, lw=1.0, label=f"{r['name']} (val)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats / byte)")
    ax_loss.set_title(f"loss (train: moving mean over {window} steps; val: dashed)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, ncol=2)

    mib = 2.0**20
    names = [r["name"] for r in results]
    bottoms = [0.0] * len(results)
    for group in _GROUPS:
        heights = [_grouped(r["breakdown"])[group] / mib for r in results]
        ax_mem.bar(names, heights, bottom=bottoms, color=_COLORS[group], label=group, width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    top = max(bottoms)
    for i, r in enumerate(results):
        ratio = report["ratios"][r["name"]]
        ax_mem.text(
            i,
            bottoms[i] + top * 0.01,
            f"{r['peak_bytes'] / mib:.1f} MiB\n{ratio['peak']:.2f}x peak\n{ratio['step_time']:.2f}x time",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax_mem.set_ylim(0, top * 1.25)
    ax_mem.set_ylabel("MiB at the peak of one training step")
    ax_mem.set_title("measured peak memory by category (ratios to Adam)")
    ax_mem.legend(fontsize=8, loc="upper right")
    ax_mem.tick_params(axis="x", labelsize=8)
    m = report["machine"]
    fig.suptitle(
        f"memfit demo — {report['config']['model']} GPT, {report['n_params']:,} params — "
        f"{m['date']}, {m['cpu_count']} CPUs, torch {m['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
