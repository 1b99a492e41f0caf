"""`MemoryReport`: what a `track()` block measured, as totals, a breakdown by category and a timeline.

The tracker records raw events (a storage of ``b`` bytes appeared or vanished at timeline point ``k``) and
one category per storage; this module turns them into per-category byte counts at every timeline point
with one ``np.add.at`` and a cumulative sum, so a report of a step with thousands of ops costs milliseconds
and the categories sum to the total at every point by construction.

Timeline points: point 0 is the block's entry (the baseline), point ``k`` (1 <= k <= n_ops) is the instant
just after op ``k`` allocated its outputs (before any tensor freed after it), and the last point is the
block's exit. Memory only falls between two ops, so the maximum over these points is the peak.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memfit.memory._common import CATEGORIES, CATEGORY_CODE, format_bytes
from memfit.memory._plot import plot_timeline

__all__ = ["CATEGORIES", "CATEGORY_CODE", "MemoryReport", "format_bytes"]


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Live tensor-storage memory of a ``memfit.memory.track()`` block, by category.

    All byte counts are storage bytes (``untyped_storage().nbytes()``), each storage counted once however
    many tensors view it.

    Attributes:
        baseline_bytes: bytes, at entry, of the tracked model's parameters, buffers and gradients, the
            optimizer's state and the declared inputs. Other tensors alive before the block are ignored.
        peak_bytes: peak of (tracked live bytes - baseline_bytes) over the block. When no baseline storage
            is freed inside the block this is exactly the peak of the storages allocated inside it.
        current_bytes: the same difference at exit (negative if the block freed more baseline memory,
            e.g. gradients set to ``None``, than it left allocated).
        total_peak_bytes: ``baseline_bytes + peak_bytes``, the maximum of the timeline total.
        peak_index: the timeline point where ``total_peak_bytes`` is first reached.
        peak_breakdown: bytes by category at the peak (baseline included); sums to ``total_peak_bytes``.
        baseline_breakdown: bytes by category at entry; sums to ``baseline_bytes``.
        final_breakdown: bytes by category at exit; sums to ``baseline_bytes + current_bytes``.
        timeline: per category, an int64 array of bytes at every timeline point (entry, after each op,
            exit).
        timeline_ops: a label per timeline point: ``"<entry>"``, the ATen op name (or ``"<mark label>"``),
            ``"<exit>"``.
        n_ops: number of ATen ops the block dispatched (plus one pseudo-op per mark).
        devices: device types of the tracked storages (``"cpu"``, ``"cuda"``, ``"meta"``).
        marks: ``(label, timeline point)`` of each ``Tracker.mark(label)`` call, in order.
        cuda_max_allocated_bytes: on CUDA, ``torch.cuda.max_memory_allocated()`` during the block minus
            ``torch.cuda.memory_allocated()`` at entry (the caching allocator's view, rounded to its blocks
            and including every tensor, not only the tracked ones); ``None`` without CUDA.
        cuda_entry_allocated_bytes: ``torch.cuda.memory_allocated()`` at entry; ``None`` without CUDA.
    """

    baseline_bytes: int
    peak_bytes: int
    current_bytes: int
    total_peak_bytes: int
    peak_index: int
    peak_breakdown: dict[str, int]
    baseline_breakdown: dict[str, int]
    final_breakdown: dict[str, int]
    timeline: dict[str, np.ndarray]
    timeline_ops: tuple[str, ...]
    n_ops: int
    devices: tuple[str, ...]
    marks: tuple[tuple[str, int], ...] = ()
    cuda_max_allocated_bytes: int | None = None
    cuda_entry_allocated_bytes: int | None = None

    @property
    def categories(self) -> tuple[str, ...]:
        """The category names, in display order."""
        return CATEGORIES

    @property
    def timeline_total(self) -> np.ndarray:
        """Total tracked bytes at every timeline point (the sum of the categories)."""
        return np.sum([self.timeline[c] for c in CATEGORIES], axis=0)

    def breakdown_at(self, index: int) -> dict[str, int]:
        """Bytes by category at timeline point ``index`` (negative indices count from the exit).

        Raises:
            IndexError: if ``index`` is outside the timeline.
        """
        n = len(self.timeline_ops)
        if not -n <= index < n:
            raise IndexError(f"timeline point {index} out of range: the timeline has {n} points (0..{n - 1})")
        return {c: int(self.timeline[c][index]) for c in CATEGORIES}

    def mark_index(self, label: str) -> int:
        """The timeline point of the first mark named ``label``.

        Raises:
            KeyError: if no mark has that label (the message lists the marks there are).
        """
        for name, index in self.marks:
            if name == label:
                return index
        raise KeyError(f"no mark {label!r}; marks: {[name for name, _ in self.marks]}")

    def table(self, *, width: int = 100) -> str:
        """Renders the breakdown as a text table: bytes at the peak, % of the peak, at entry and at exit.

        Args:
            width: characters per line of the rendered table.

        Returns:
            The table as plain text (no terminal escape codes).
        """
        from rich.console import Console
        from rich.table import Table

        peak = self.total_peak_bytes
        table = Table(title=f"memory by category (peak at op {self.peak_index} of {self.n_ops})")
        table.add_column("category")
        for header in ("at peak", "% of peak", "at entry", "at exit"):
            table.add_column(header, justify="right")
        for c in CATEGORIES:
            at_peak = self.peak_breakdown[c]
            share = f"{100.0 * at_peak / peak:.1f}%" if peak > 0 else "-"
            table.add_row(
                c,
                format_bytes(at_peak),
                share,
                format_bytes(self.baseline_breakdown[c]),
                format_bytes(self.final_breakdown[c]),
            )
        table.add_section()
        table.add_row(
            "total",
            format_bytes(peak),
            "100.0%" if peak > 0 else "-",
            format_bytes(self.baseline_bytes),
            format_bytes(self.baseline_bytes + self.current_bytes),
        )
        console = Console(file=io.StringIO(), width=width, no_color=True, color_system=None)
        console.print(table)
        lines = [console.file.getvalue().rstrip()]  # type: ignore[attr-defined]
        if self.cuda_max_allocated_bytes is not None:
            lines.append(
                f"torch.cuda.max_memory_allocated() above entry: {format_bytes(self.cuda_max_allocated_bytes)}"
                f" (tracked peak above baseline: {format_bytes(self.peak_bytes)})"
            )
        return "\n".join(lines)

    def to_dict(self, *, timeline: bool = True) -> dict[str, Any]:
        """Returns the report as plain JSON-able data (ints, strings, lists).

        Args:
            timeline: include the per-point timeline (one list per category) and the op labels.
        """
        out: dict[str, Any] = {
            "categories": list(CATEGORIES),
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "current_bytes": self.current_bytes,
            "total_peak_bytes": self.total_peak_bytes,
            "peak_index": self.peak_index,
            "peak_breakdown": dict(self.peak_breakdown),
            "baseline_breakdown": dict(self.baseline_breakdown),
            "final_breakdown": dict(self.final_breakdown),
            "n_ops": self.n_ops,
            "devices": list(self.devices),
            "marks": [[name, index] for name, index in self.marks],
            "cuda_max_allocated_bytes": self.cuda_max_allocated_bytes,
            "cuda_entry_allocated_bytes": self.cuda_entry_allocated_bytes,
        }
        if timeline:
            out["timeline"] = {c: [int(v) for v in self.timeline[c]] for c in CATEGORIES}
            out["timeline_ops"] = list(self.timeline_ops)
        return out

    def to_json(self, path: str | Path, *, timeline: bool = True) -> None:
        """Writes :meth:`to_dict` to ``path`` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(timeline=timeline), indent=1))

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Writes a stacked timeline of bytes by category to a PNG, with the peak marked.

        Args:
            path: where to write the image (``.png``).
            title: the figure title; a default names the peak.

        Returns:
            The path written.
        """
        return plot_timeline(self, Path(path), title=title)


def build_report(
    *,
    n_ops: int,
    op_names: Sequence[str],
    event_points: Sequence[int],
    event_sids: Sequence[int],
    event_deltas: Sequence[int],
    sid_category: Sequence[int],
    baseline_bytes: int,
    devices: Sequence[str],
    marks: Sequence[tuple[str, int]] = (),
    cuda_max_allocated_bytes: int | None,
    cuda_entry_allocated_bytes: int | None,
) -> MemoryReport:
    """Turns a tracker's raw events into a :class:`MemoryReport`.

    Args:
        n_ops: ops dispatched in the block; the timeline has ``n_ops + 2`` points.
        op_names: a name per op, in order (``len == n_ops``).
        event_points: the timeline point from which each event's byte change applies.
        event_sids: the storage id of each event.
        event_deltas: the byte change of each event (+nbytes on allocation, -nbytes on free).
        sid_category: the category code of every storage id (its final, strongest role).
        baseline_bytes: bytes registered at entry.
        devices: device types seen.
        marks: ``(label, point)`` of each mark.
        cuda_max_allocated_bytes: see :class:`MemoryReport`.
        cuda_entry_allocated_bytes: see :class:`MemoryReport`.
    """
    n_points = n_ops + 2
    grid = np.zeros((n_points, len(CATEGORIES)), dtype=np.int64)
    if len(event_points):
        points = np.asarray(event_points, dtype=np.int64)
        cats = np.asarray(sid_category, dtype=np.int64)[np.asarray(event_sids, dtype=np.int64)]
        np.add.at(grid, (points, cats), np.asarray(event_deltas, dtype=np.int64))
    grid = np.cumsum(grid, axis=0)
    total = grid.sum(axis=1)
    peak_index = int(np.argmax(total))
    total_peak = int(total[peak_index])

    def row(i: int) -> dict[str, int]:
        return {c: int(grid[i, j]) for j, c in enumerate(CATEGORIES)}

    return MemoryReport(
        baseline_bytes=baseline_bytes,
        peak_bytes=total_peak - baseline_bytes,
        current_bytes=int(total[-1]) - baseline_bytes,
        total_peak_bytes=total_peak,
        peak_index=peak_index,
        peak_breakdown=row(peak_index),
        baseline_breakdown=row(0),
        final_breakdown=row(n_points - 1),
        timeline={c: grid[:, j].copy() for j, c in enumerate(CATEGORIES)},
        timeline_ops=("<entry>", *op_names, "<exit>"),
        n_ops=n_ops,
        devices=tuple(sorted(set(devices))),
        marks=tuple(marks),
        cuda_max_allocated_bytes=cuda_max_allocated_bytes,
        cuda_entry_allocated_bytes=cuda_entry_allocated_bytes,
    )
