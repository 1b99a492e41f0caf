"""What an optimizer step does with a NaN or infinite gradient entry: raise, skip the step, or propagate it.

Why a policy at all: in SM3 a single NaN gradient entry makes ``nu`` NaN, and every accumulator whose slice
holds that entry (its row's and its column's) becomes NaN for good: ``min`` and ``max`` carry NaN into every
later step of the row and column. The default (``"raise"``) stops before anything is written; ``"skip"``
leaves the param group as it was, like ``torch.amp.GradScaler`` skipping a step; ``"propagate"`` lets the
NaN reach the parameters, where the loss shows it (what ``torch.optim.Adam`` does). No policy is silent.

Cost of the check (``"raise"`` and ``"skip"``): one sum per gradient tensor (a single read pass, stacked)
and one host synchronisation per step, whatever the number of param groups; ``"propagate"`` costs nothing.
A sum is NaN or inf iff some entry is, or iff it overflows the float range (then some entry's square
overflows float32 too, as SM3's accumulators would). Measured on 21M float32 entries, one CPU thread:
sums 31 ms, ``torch._foreach_norm`` 32 (ord 2; it also flags finite entries whose squares overflow, such
as a bf16 gradient of 1e30, which SM3 handles) and 85 (ord 1), the inf-norm 279. The per-entry counts of
the error message are computed only when a step fails.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor

__all__ = ["NONFINITE_POLICIES", "NonFiniteGradientError", "NonFinitePolicy", "nonfinite_groups", "offenders"]

NonFinitePolicy = Literal["raise", "skip", "propagate"]
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip", "propagate")


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or inf under ``nonfinite="raise"``; the optimizer updated nothing.

    A ``RuntimeError``, as ``torch.nn.utils.clip_grad_norm_(error_if_nonfinite=True)`` raises.

    Attributes:
        offenders: ``(name, shape, nan_count, inf_count)`` per parameter whose gradient is not finite (both
            counts 0: finite entries whose sum is beyond the float range).
    """

    def __init__(self, optimizer: str, offenders: list[tuple[str, tuple[int, ...], int, int]]) -> None:
        self.offenders = offenders
        shown = "; ".join(
            f"{n} {list(s)}: " + (f"{nan} NaN, {inf} inf" if nan or inf else "sum beyond the float range")
            for n, s, nan, inf in offenders[:5]
        )
        more = f" (and {len(offenders) - 5} more)" if len(offenders) > 5 else ""
        super().__init__(
            f"{optimizer}: non-finite gradient in {len(offenders)} parameter(s): {shown}{more}. Nothing was "
            "updated. Fix the loss or lower the lr, or pass nonfinite='skip' to skip such steps (as "
            "torch.amp.GradScaler does) or nonfinite='propagate' to let NaN reach the parameters."
        )


def _local(t: Tensor) -> Tensor:
    # A sparse gradient's stored values; a DTensor's is checked as a DTensor (its flag is reduced over
    # the mesh, so every rank takes the same decision and none waits in a collective the others skip).
    return t._values() if t.is_sparse else t


def _is_dtensor(t: Tensor) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _dtensor_flags(grads: Sequence[Tensor]) -> list[Tensor]:
    """Per device mesh, a 0-d tensor: 1.0 where some rank's shard of some gradient is not finite, else 0.0.

    Each rank checks its local shard (an empty shard is finite); one ``Partial("max")`` reduction per mesh
    makes every rank take the same decision, so none waits in a collective that the others skip. The flags
    are reduced as 0/1, not as norms: a collective's MAX need not propagate NaN.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial

    by_mesh: dict[int, tuple[Any, list[Tensor]]] = {}
    for g in grads:
        if not _is_dtensor(g):
            continue
        local = cast(DTensor, g).to_local()
        bad = (~local.isfinite()).any() if local.numel() else local.new_zeros((), dtype=torch.bool)
        mesh = cast(DTensor, g).device_mesh
        by_mesh.setdefault(id(mesh), (mesh, []))[1].append(bad.to(torch.float32))
    out = []
    for mesh, flags in by_mesh.values():
        partial = DTensor.from_local(torch.stack(flags).amax(), mesh, [Partial("max")] * mesh.ndim)
        out.append(partial.full_tensor())
    return out


def _all_finite(grads: Sequence[Tensor]) -> Tensor | None:
    """A 0-d bool tensor: every entry of every gradient is finite (None: nothing to check)."""
    plain = [v for v in (_local(g) for g in grads if not _is_dtensor(g)) if v.numel() > 0]
    checks = []
    if plain:
        device = plain[0].device
        sums = [v.sum().to(device=device, dtype=torch.float32) for v in plain]
        checks.append(torch.stack(sums).isfinite().all())
    flags = _dtensor_flags(grads)
    if flags:
        device = flags[0].device
        checks.append((torch.stack([f.to(device) for f in flags]) == 0).all())
    if not checks:
        return None
    return checks[0] if len(checks) == 1 else checks[0].to(checks[1].device) & checks[1]


def nonfinite_groups(groups: Sequence[dict[str, Any]], key: str = "nonfinite") -> list[bool]:
    """Which param groups have a non-finite gradient, among those whose policy checks (not ``"propagate"``).

    One sum per gradient and one host synchronisation for all the groups.

    Returns:
        One flag per group (``False`` for a ``"propagate"`` group or one without gradients).
    """
    flags: list[Tensor | None] = []
    for group in groups:
        if group[key] == "propagate":
            flags.append(None)
            continue
        flags.append(_all_finite([p.grad for p in group["params"] if p.grad is not None]))
    checked = [f for f in flags if f is not None]
    if not checked:
        return [False] * len(groups)
    finite = iter(torch.stack([f.to(checked[0].device) for f in checked]).tolist())  # the one sync
    return [False if f is None else not next(finite) for f in flags]


def offenders(group: dict[str, Any], group_index: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """``(name, shape, nan_count, inf_count)`` of each parameter of ``group`` with a non-finite gradient."""
    names = group.get("param_names")
    out = []
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        g = _local(p.grad)
        if _is_dtensor(g):
            g = g.full_tensor()  # type: ignore[attr-defined]
        nan, inf = int(g.isnan().sum()), int(g.isinf().sum())
        if nan or inf or not bool(g.sum().isfinite()):
            name = names[i] if names else f"param_groups[{group_index}]['params'][{i}]"
            out.append((name, tuple(p.shape), nan, inf))
    return out
