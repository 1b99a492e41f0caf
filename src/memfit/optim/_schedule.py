"""The SM3 authors' learning-rate schedule: quadratic warm-up, constant, optional linear cool-down.

From the google-research ``sm3`` README: the learning rate ramps up as ``lr * min(1, (t / warmup)^2)``
(the README prints the ratio inverted, ``(warmup / t)^2``; the ramp-up form is the one that makes sense
and the one used here), stays constant, and optionally decays linearly to ``final_ratio * lr`` over the
last ``cooldown_steps`` of ``total_steps``.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["sm3_lr_factor", "sm3_warmup_schedule"]


def _check(warmup_steps: int, total_steps: int | None, cooldown_steps: int, final_ratio: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if cooldown_steps < 0:
        raise ValueError(f"cooldown_steps must be >= 0, got {cooldown_steps}")
    if cooldown_steps > 0 and total_steps is None:
        raise ValueError(f"cooldown_steps={cooldown_steps} needs total_steps (when the cool-down ends)")
    if total_steps is not None and total_steps < warmup_steps + cooldown_steps:
        raise ValueError(
            f"total_steps={total_steps} must be >= warmup_steps + cooldown_steps = "
            f"{warmup_steps} + {cooldown_steps}"
        )
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")


def sm3_lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int | None = None,
    cooldown_steps: int = 0,
    final_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based count of optimizer steps taken).

    ``min(1, (step / warmup_steps)^2)``; during the last ``cooldown_steps`` steps before ``total_steps``
    it falls linearly from 1 to ``final_ratio`` (and stays there after ``total_steps``).

    Args:
        step: number of optimizer steps taken so far (``LambdaLR``'s ``last_epoch``).
        warmup_steps: length of the quadratic warm-up; 0 disables it.
        total_steps: end of training (needed with a cool-down).
        cooldown_steps: length of the linear cool-down; 0 disables it.
        final_ratio: multiplier reached at the end of the cool-down.

    Returns:
        The factor in ``[0, 1]``.

    Raises:
        ValueError: on negative lengths, a cool-down without ``total_steps``, or ``final_ratio`` out of
            ``[0, 1]``.
    """
    _check(warmup_steps, total_steps, cooldown_steps, final_ratio)
    factor = 1.0 if warmup_steps == 0 else min(1.0, (step / warmup_steps) ** 2)
    if cooldown_steps > 0 and total_steps is not None:
        start = total_steps - cooldown_steps
        if step >= start:
            done = min(1.0, (step - start) / cooldown_steps)
            factor = min(factor, 1.0 - (1.0 - final_ratio) * done)
    return factor


def sm3_warmup_schedule(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    total_steps: int | None = None,
    cooldown_steps: int = 0,
    final_ratio: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`sm3_lr_factor` to every param group (call ``.step()`` after each step).

    Example:
        >>> import torch
        >>> from memfit.optim import SM3, sm3_warmup_schedule
        >>> opt = SM3([torch.nn.Parameter(torch.zeros(3))], lr=0.1, fused=False)
        >>> sched = sm3_warmup_schedule(opt, warmup_steps=100)
        >>> round(opt.param_groups[0]["lr"], 12)  # (0 / 100)^2 * 0.1 before the first step
        0.0

    Raises:
        ValueError: as :func:`sm3_lr_factor`.
    """
    _check(warmup_steps, total_steps, cooldown_steps, final_ratio)

    def factor(step: int) -> float:
        return sm3_lr_factor(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            cooldown_steps=cooldown_steps,
            final_ratio=final_ratio,
        )

    return LambdaLR(optimizer, factor, last_epoch=last_epoch)
