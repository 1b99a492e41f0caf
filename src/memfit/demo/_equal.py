"""Equal memory: the largest batch that SM3 + remat fits in the memory Adam needs, chosen by the planner.

The choice is a prediction (:func:`memfit.plan.estimate`, meta and fake tensors, nothing allocated), not a trial
run: the planner predicts Adam's peak at the demo's batch, takes it as the limit, predicts the largest batch that
SM3 with the remat budget fits under it, and checks that batch with one more prediction (the largest-batch figure
is a linear extrapolation; the check steps down while the predicted peak exceeds the limit).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["EqualMemoryPlan", "plan_equal_memory"]


@dataclass(frozen=True, kw_only=True)
class EqualMemoryPlan:
    """What the planner chose.

    Attributes:
        limit_bytes: the planner's predicted peak of one Adam step at the demo's batch (the limit).
        batch_size: the largest batch predicted to fit under the limit with ``optimizer`` and ``remat_budget``.
        remat_budget: the remat budget of the chosen row (``None`` when no remat row was feasible).
        predicted_peak_bytes: the planner's predicted peak of one step at ``batch_size``.
        optimizer: the planner's optimizer key (``"sm3"``: SM3 without momentum).
        seconds: wall time of the predictions.
    """

    limit_bytes: int
    batch_size: int
    remat_budget: float | None
    predicted_peak_bytes: int
    optimizer: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_equal_memory(
    model: str, batch_size: int, seq_len: int, *, remat_budget: float, optimizer: str = "sm3"
) -> EqualMemoryPlan:
    """Predict the largest batch that ``optimizer`` + remat fits in the memory Adam needs at ``batch_size``.

    Args:
        model: a preset of :mod:`memfit.models`.
        batch_size: the demo's batch (Adam's).
        seq_len: tokens per sequence (every run's).
        remat_budget: the remat budget (fraction, see :func:`memfit.remat.compile`); when the planner finds it
            infeasible, the row without remat is used.
        optimizer: a key of :data:`memfit.plan.OPTIMIZERS`.

    Returns:
        The :class:`EqualMemoryPlan` (its batch is at least ``batch_size``).
    """
    from memfit.plan import estimate  # builds models on meta: only when asked

    t0 = time.perf_counter()
    limit = estimate(model, batch_size, seq_len, optimizers=("adam",), remat=(None,)).rows[0].peak_bytes
    est = estimate(
        model, batch_size, seq_len, memory=limit, optimizers=(optimizer,), remat=(None, remat_budget)
    )
    rows = {r.remat: r for r in est.rows if r.optimizer == optimizer}
    row = rows.get(remat_budget, rows[None])
    best = max(batch_size, row.max_batch or 0)
    predicted = 0
    for b in range(best, batch_size - 1, -1):
        at = estimate(model, b, seq_len, optimizers=(optimizer,), remat=(row.remat,)).rows
        if at and (at[0].peak_bytes <= limit or b == batch_size):
            best, predicted = b, at[0].peak_bytes
            break
    return EqualMemoryPlan(
        limit_bytes=limit,
        batch_size=best,
        remat_budget=row.remat,
        predicted_peak_bytes=predicted,
        optimizer=optimizer,
        seconds=time.perf_counter() - t0,
    )
