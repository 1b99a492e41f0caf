"""Measure where the bytes of a training step go: live tensor memory by category, totals and timeline.

Usage::

    from memfit.memory import track

    with track(model, optimizer, inputs=batch) as t:
        loss_fn(model(batch), target).backward()
        optimizer.step()
    print(t.report.table())          # parameters / gradients / optimizer state / activations / ...
    t.report.plot("step_memory.png")  # stacked timeline, peak marked

See ``docs/memory.md`` for what each category means and how it is measured.
"""

from memfit.memory._report import CATEGORIES, MemoryReport, format_bytes
from memfit.memory._tracker import Tracker, TrackerError, track

__all__ = ["CATEGORIES", "MemoryReport", "Tracker", "TrackerError", "format_bytes", "track"]
