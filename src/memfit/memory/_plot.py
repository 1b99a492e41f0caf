"""A stacked-area picture of a `MemoryReport` timeline: bytes by category after every op, peak marked."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from memfit.memory._common import CATEGORIES, format_bytes

__all__ = ["plot_timeline"]


class _Timeline(Protocol):
    """What the picture reads of a :class:`~memfit.memory.MemoryReport` (which satisfies it)."""

    @property
    def total_peak_bytes(self) -> int: ...
    @property
    def peak_index(self) -> int: ...
    @property
    def timeline(self) -> dict[str, np.ndarray]: ...
    @property
    def timeline_ops(self) -> tuple[str, ...]: ...
    @property
    def n_ops(self) -> int: ...
    @property
    def marks(self) -> tuple[tuple[str, int], ...]: ...


# One colour per category, stable across plots so two reports can be compared by eye: model state in
# blues/purples (resident for the whole step), the step's own memory in warm colours.
_COLOURS: dict[str, str] = {
    "parameters": "#1f4e9c",
    "buffers": "#6a8fd0",
    "optimizer_state": "#7b3fa0",
    "gradients": "#2a9d8f",
    "inputs": "#8d99ae",
    "activations": "#e76f51",
    "temporaries": "#f4a261",
}

_UNIT_STEPS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))


def plot_timeline(report: _Timeline, path: Path, *, title: str | None = None) -> Path:
    """Writes ``report``'s timeline as a stacked-area PNG.

    The x axis is the timeline point (0 = entry, then one point per ATen op, then exit); the y axis is
    bytes in the largest binary unit the peak reaches. Categories that stay at zero are left out of the
    legend. A dashed line and a label mark the peak; dotted lines the
    tracker's named marks.

    Args:
        report: the report to draw.
        path: output file; its parent directory must exist.
        title: figure title; by default it names the peak.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    peak = report.total_peak_bytes
    scale, unit = next(((s, u) for s, u in _UNIT_STEPS if peak >= s), (1, "B"))
    x = np.arange(len(report.timeline_ops))
    shown = [c for c in CATEGORIES if np.any(report.timeline[c] != 0)]
    series = [report.timeline[c] / scale for c in shown]

    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=110)
    if shown:
        # step="post": the value at point k holds until point k+1, as memory does between two ops.
        ax.stackplot(
            x,
            *series,
            labels=shown,
            colors=[_COLOURS[c] for c in shown],
            step="post",
            linewidth=0,
        )
    for label, index in report.marks:
        ax.axvline(index, color="grey", linestyle=":", linewidth=1)
        # Labelled near the top, in axes-fraction height, where the legend and areas leave room.
        ax.text(
            index,
            0.98,
            f"{label} ",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
            color="dimgrey",
        )
    ax.axvline(report.peak_index, color="black", linestyle="--", linewidth=1)
    ax.annotate(
        f"peak {format_bytes(peak)}\n({report.timeline_ops[report.peak_index]})",
        xy=(report.peak_index, peak / scale),
        xytext=(8, -4),
        textcoords="offset points",
        va="top",
        fontsize=8,
    )
    ax.set_xlim(0, max(len(x) - 1, 1))
    ax.set_ylim(0, max(peak / scale, 1e-9) * 1.12)
    ax.set_xlabel(f"op ({report.n_ops} ATen ops; 0 = entry)")
    ax.set_ylabel(f"live tensor memory ({unit})")
    ax.set_title(title or f"memory by category — peak {format_bytes(peak)} at op {report.peak_index}")
    if shown:
        # Legend top to bottom in the order the areas are stacked (last drawn on top).
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], loc="upper left", fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
