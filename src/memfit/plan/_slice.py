"""The slice rule of deep GPT presets, shared by the ordinary and the in-backward remat rows.

A GPT deeper than the plan's slice is scheduled on the slice: the full model needs at least what the slice needs
plus, for each further block, its input (the checkpoint a block boundary keeps); a budget above that is taken as
met. The overhead is the slice's at the same fraction, or at the slice's smallest feasible budget when the
fraction is below it (an upper bound).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from memfit.memory import format_bytes

__all__ = ["slice_budgets"]


def slice_budgets(
    solve: Callable[[int | None, str], Any],
    inputs: int,
    full_noninput: int,
    further_bytes: int,
    budgets: Sequence[float],
    method: str,
    notes: list[str],
    label: str = "",
) -> dict[float, tuple[int, float]]:
    """Budget fraction -> (the full model's peak beyond inputs, the slice's compute overhead) of each feasible one.

    Args:
        solve: ``solve(budget_bytes or None, method) -> Schedule`` of the slice's graph (``None``: no remat).
        inputs: bytes of the slice's graph inputs.
        full_noninput: the full model's no-remat peak beyond inputs (what a fraction is of).
        further_bytes: what the blocks beyond the slice add to the least memory.
        budgets: fractions of ``full_noninput``.
        method: the remat solver.
        notes: infeasible budgets are noted here.
        label: said after the budget in a note (e.g. ``", step in backward"``).
    """
    from memfit import remat as _remat

    base = solve(None, "noremat").simulate()
    slice_noninput = base.peak - inputs
    try:
        solve(inputs + 1, method)
        slice_min = 1
    except _remat.InfeasibleBudget as exc:
        slice_min = exc.min_peak - inputs
    full_min = slice_min + further_bytes
    plans: dict[float, tuple[int, float]] = {}
    for b in budgets:
        target = int(b * full_noninput)
        if target < full_min:
            notes.append(
                f"remat {b:.0%}{label}: infeasible (needs at least ~{format_bytes(full_min)} beyond inputs, "
                f"{full_min / max(full_noninput, 1):.0%} of no remat{label.replace(', step', '')})"
            )
            continue
        sim = solve(inputs + max(int(b * slice_noninput), int(slice_min * 1.02)), method).simulate()
        plans[b] = (target, sim.cost / base.cost if base.cost else 1.0)
    return plans
