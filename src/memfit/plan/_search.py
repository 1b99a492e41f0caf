"""The largest batch that fits: a step's memory as a function of the batch size, from two traces.

A step's ops do not depend on the batch size, only their tensors' sizes do, and each tensor is either
independent of the batch (parameters, gradients, state) or proportional to it (activations: dim 0 is the batch).
Traced at two batch sizes ``b1 < b2`` the tracker's timelines have the same points, and the memory at point ``k``
is ``a_k + c_k * B`` for every ``B``. The peak at ``B`` is the largest of those lines — exact at every batch size,
not an extrapolation of the peak — and the largest batch that fits a limit follows by bisection.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["PeakCurve", "largest_batch"]


class PeakCurve:
    """``peak(B) = max_k (a_k + c_k B)`` from the total-bytes timelines of two traces.

    Args:
        b1, t1: a batch size and its trace's timeline (bytes at every point).
        b2, t2: a larger batch size and its timeline. When the two timelines differ in length (the step's ops
            depend on the batch), the curve is the line through the two peaks.
    """

    def __init__(self, b1: int, t1: np.ndarray, b2: int, t2: np.ndarray) -> None:
        if b2 <= b1:
            raise ValueError(f"need b1 < b2, got {b1}, {b2}")
        if len(t1) == len(t2):
            x1, x2 = np.asarray(t1, dtype=np.float64), np.asarray(t2, dtype=np.float64)
            self.exact = True
        else:
            x1, x2 = np.array([float(np.max(t1))]), np.array([float(np.max(t2))])
            self.exact = False
        self.slope = (x2 - x1) / (b2 - b1)
        self.intercept = x1 - self.slope * b1

    def __call__(self, batch: int) -> int:
        return round(float(np.max(self.intercept + self.slope * batch)))

    def per_example(self) -> float:
        """Bytes the peak grows by per example (at the largest slope)."""
        return float(np.max(self.slope))


def largest_batch(peak: Callable[[int], float], limit: int, *, upper: int = 1 << 24) -> int:
    """The largest ``B >= 1`` with ``peak(B) <= limit`` for a nondecreasing ``peak`` (0 when ``B = 1`` does not fit).

    ``upper`` bounds the search (a step whose memory does not grow with the batch fits at every size).
    """
    if peak(1) > limit:
        return 0
    lo, hi = 1, 2
    while hi < upper and peak(hi) <= limit:
        lo, hi = hi, hi * 2
    if hi >= upper and peak(upper) <= limit:
        return upper
    while hi - lo > 1:  # peak(lo) fits, peak(hi) does not
        mid = (lo + hi) // 2
        if peak(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo
