"""The optimizer step inside the backward: each parameter is updated, and its gradient freed, as soon as the
gradient is final, so the full set of gradients is never resident at once.

    handle = memfit.optim.step_in_backward(optimizer)
    for batch in loader:
        loss_fn(model, batch).backward()     # or step(batch) of memfit.remat.compile: the updates run inside it
        scheduler.step()                     # LR schedulers, param groups and state_dict work as before
    handle.remove()                          # back to the ordinary loop

How: a post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``) on every parameter of the
optimizer. Autograd calls it right after the parameter's gradient is accumulated into ``p.grad`` for the last
time in the backward; :class:`memfit.remat.RematStep` calls it inside its schedule, right after the gradient is
computed, and its solver counts that gradient as transient (:mod:`memfit.remat.eager.updates`). The hook runs
the user's own optimizer on that one parameter -- its ``param_groups`` narrowed to the parameter's group holding
only that parameter, for the length of one call of the optimizer's ``step`` -- and sets ``p.grad = None``. State,
hyperparameters and step counters stay in the user's optimizer, so ``state_dict``, ``load_state_dict`` and LR
schedulers see one optimizer, as in the ordinary loop (the optimizer-per-parameter recipe of PyTorch's tutorial
"How to save memory by fusing the optimizer step into the backward pass" does not have that property).

Clipping by the global gradient norm needs every gradient before the first update. Two modes:

- ``"two_pass"`` (exact; LOMO, Lv et al. 2023, section 3.3): a first backward only measures each gradient's norm
  and frees it; the second scales every gradient by ``min(1, max_norm / (total_norm + 1e-6))`` (the coefficient of
  ``torch.nn.utils.clip_grad_norm_``) before its update. Costs a second backward (and, through
  :meth:`StepInBackward.run`, a second forward).
- ``"previous"`` (an approximation): each step is clipped with the coefficient of the previous step's total norm,
  measured during that step's backward for free; the first step is not clipped. A step whose norm jumps above the
  previous one's is clipped too little; one that falls, too much.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

__all__ = ["ClipMode", "StepInBackward", "step_in_backward"]

ClipMode = Literal["two_pass", "previous"]
_T = TypeVar("_T")

# optimizer -> its active handle: two handles on one optimizer would update every parameter twice
_ACTIVE: weakref.WeakKeyDictionary[torch.optim.Optimizer, StepInBackward] = weakref.WeakKeyDictionary()


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


class StepInBackward:
    """The handle :func:`step_in_backward` returns; see there. ``remove()`` restores the ordinary loop.

    Attributes:
        optimizer: the optimizer whose step runs inside the backward.
        clip_grad_norm: the maximum global 2-norm of the gradients, or ``None`` (no clipping).
        clip_mode: how the global norm is known in time (``"two_pass"`` or ``"previous"``).
        last_norm: the total gradient 2-norm of the last step (before clipping) when clipping, else ``None``
            (a 0-d tensor, as ``clip_grad_norm_`` returns it).
        updates: how many per-parameter updates have run.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad_norm: float | None,
        clip_mode: ClipMode,
    ) -> None:
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.clip_mode = clip_mode
        self.last_norm: Tensor | None = None
        self.updates = 0
        self._mode: Literal["idle", "measure", "update"] = "idle"
        self._norms: list[Tensor] = []
        self._coef: Tensor | None = None
        # the optimizer's own step without the class-level wrapper that runs the step hooks: those run once per
        # step, when the user calls optimizer.step() (a no-op for the parameters updated here, see the docs)
        step_fn = type(optimizer).step
        self._raw_step: Callable[..., Any] = (
            step_fn.__wrapped__ if getattr(step_fn, "hooked", False) else step_fn  # type: ignore[attr-defined]
        )
        self._groups_key: tuple[int, ...] = ()
        self._group_of: dict[int, dict[str, Any]] = {}
        self._params: list[Tensor] = [
            p for group in optimizer.param_groups for p in group["params"] if p.requires_grad
        ]
        from memfit.remat.eager.updates import consumes_gradient

        # marked: memfit.remat's step runs it inside its schedule and plans the gradient as transient
        hook = consumes_gradient(lambda p: self._hook(p))
        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self._params]
        _ACTIVE[optimizer] = self

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (until :meth:`remove`)."""
        return bool(self._hooks)

    def remove(self) -> None:
        """Unregister the hooks: from now on ``backward()`` leaves gradients in ``p.grad`` for ``optimizer.step()``."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if _ACTIVE.get(self.optimizer) is self:
            del _ACTIVE[self.optimizer]

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ one training step
    def backward(self, loss: Tensor) -> None:
        """``loss.backward()`` with the updates inside; with ``clip_mode="two_pass"`` the backward runs twice
        (the first with ``retain_graph=True``, measuring the norm).

        Needed only when clipping; without clipping ``loss.backward()`` does the same.
        """
        if self.clip_grad_norm is not None and self.clip_mode == "two_pass":
            self._measure(lambda: loss.backward(retain_graph=True))
        self._update_pass(loss.backward)

    def run(self, closure: Callable[[], _T]) -> _T:
        """Run ``closure`` (a forward and backward, e.g. ``lambda: step(batch)`` of ``memfit.remat.compile``, or
        ``lambda: loss_fn(model, batch).backward()``) with the updates inside, and return its result.

        With ``clip_mode="two_pass"`` the closure runs twice: first measuring the norm, then updating; the random
        number generators are restored in between, so both passes draw the same dropout masks.
        """
        if self.clip_grad_norm is not None and self.clip_mode == "two_pass":
            cuda = sorted({p.device.index or 0 for p in self._params if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=cuda):
                self._measure(closure)
        return self._update_pass(closure)

    def _measure(self, fn: Callable[[], Any]) -> None:
        self._mode, self._norms = "measure", []
        try:
            fn()
        finally:
            self._mode = "idle"
        self._coef = self._coefficient()

    def _update_pass(self, fn: Callable[[], _T]) -> _T:
        previous = self.clip_grad_norm is not None and self.clip_mode == "previous"
        if previous:
            self._norms = []
        self._mode = "update"
        try:
            out = fn()
        finally:
            self._mode = "idle"
            if self.clip_grad_norm is not None and self.clip_mode == "two_pass":
                self._coef = None
        if previous:
            self._coef = self._coefficient()  # for the next step
        return out

    def _coefficient(self) -> Tensor | None:
        """``min(1, max_norm / (total + 1e-6))`` over the norms measured, as ``torch.nn.utils.clip_grad_norm_``."""
        assert self.clip_grad_norm is not None
        if not self._norms:
            return None
        total = torch.linalg.vector_norm(torch.stack([n.to(self._norms[0].device) for n in self._norms]), 2.0)
        self.last_norm = total
        self._norms = []
        return torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)

    # ------------------------------------------------------------------ per parameter
    def _hook(self, p: Tensor) -> None:
        g = p.grad
        if g is None:
            return
        if self._mode == "idle" and self.clip_grad_norm is not None:
            p.grad = None
            raise RuntimeError(
                "step_in_backward with clip_grad_norm: run the backward through handle.backward(loss) or "
                "handle.run(closure), which know where a step begins and ends (a bare loss.backward() cannot clip)"
            )
        with torch.no_grad():
            if self._mode == "measure":
                self._norms.append(torch.linalg.vector_norm(g, 2.0))
                p.grad = None
                return
            if self.clip_grad_norm is not None and self.clip_mode == "previous":
                self._norms.append(torch.linalg.vector_norm(g, 2.0))
            if self._coef is not None:
                g.mul_(self._coef.to(g.device))
        self._update(p)
        p.grad = None

    def _group(self, p: Tensor) -> dict[str, Any]:
        groups = self.optimizer.param_groups
        key = (id(groups), *(id(g) for g in groups), *(id(g["params"]) for g in groups))
        if key != self._groups_key:  # load_state_dict and add_param_group replace the group dicts
            self._group_of = {id(q): g for g in groups for q in g["params"]}
            self._groups_key = key
        try:
            return self._group_of[id(p)]
        except KeyError:
            raise RuntimeError(
                "step_in_backward: a hooked parameter is no longer in the optimizer's param_groups; "
                "call handle.remove() before changing which parameters the optimizer holds"
            ) from None

    def _update(self, p: Tensor) -> None:
        """One step of the user's optimizer on ``p`` alone: its group, narrowed to ``[p]``, for one call."""
        opt = self.optimizer
        group = self._group(p)
        groups, params = opt.param_groups, group["params"]
        group["params"] = [p]
        opt.param_groups = [group]
        try:
            self._raw_step(opt)
        finally:
            group["params"] = params
            opt.param_groups = groups
        self.updates += 1


def step_in_backward(
    optimizer: torch.optim.Optimizer,
    *,
    clip_grad_norm: float | None = None,
    clip_mode: ClipMode = "two_pass",
) -> StepInBackward:
    """Run ``optimizer``'s update of each parameter inside the backward, as soon as its gradient is final.

    From this call until ``handle.remove()``, every backward through the optimizer's parameters -- an ordinary
    ``loss.backward()`` or a step of :func:`memfit.remat.compile` -- updates each parameter right after its
    gradient is computed and frees the gradient (``p.grad`` is ``None`` afterwards). The gradients are never all
    resident at once: the peak of a step falls by up to the gradients' bytes, and the remat solver plans with the
    gradients as transient values.

    While active:

    - ``optimizer.step()`` and ``optimizer.zero_grad()`` are no-ops for the updated parameters (their ``.grad`` is
      ``None``), so an unchanged loop works and never steps twice; step hooks registered on the optimizer run
      there, once per step, after that step's updates.
    - LR schedulers, param groups, ``state_dict()``/``load_state_dict()`` work on the optimizer as usual: the
      updates read the group's hyperparameters at the moment they run.
    - Gradient accumulation over several backward passes is not possible (each backward updates).
    - With ``clip_grad_norm``, run the backward through :meth:`StepInBackward.backward` or
      :meth:`StepInBackward.run` (they mark where a step begins and ends); a bare ``loss.backward()`` raises.

    Args:
        optimizer: a ``torch.optim.Optimizer`` whose update treats each parameter on its own (every ``torch.optim``
            optimizer but ``LBFGS``; memfit's SM3, including its fused CPU kernel).
        clip_grad_norm: clip the gradients to this global 2-norm (as ``torch.nn.utils.clip_grad_norm_``); ``None``:
            no clipping.
        clip_mode: ``"two_pass"`` (exact: one backward measures the norm, a second updates) or ``"previous"``
            (approximate: the previous step's norm; the first step is not clipped).

    Returns:
        The :class:`StepInBackward` handle.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, or is one that needs every gradient at once
            (``LBFGS``, ``ZeroRedundancyOptimizer``).
        ValueError: ``clip_grad_norm`` is not a positive finite number, or ``clip_mode`` is unknown.
        RuntimeError: another handle is active on this optimizer, or the parameters are distributed: DTensor
            (FSDP2) parameters, or a process group of more than one process (DDP), where the hooks would fire
            before the gradients are reduced across processes.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"step_in_backward needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS) or type(optimizer).__name__ == "ZeroRedundancyOptimizer":
        raise TypeError(
            f"step_in_backward: {type(optimizer).__name__} needs every gradient at once (its update is not "
            "per parameter); use the ordinary loop"
        )
    if clip_grad_norm is not None and (
        isinstance(clip_grad_norm, bool)
        or not isinstance(clip_grad_norm, (int, float))
        or not math.isfinite(clip_grad_norm)
        or clip_grad_norm <= 0
    ):
        raise ValueError(f"clip_grad_norm must be a positive finite number or None, got {clip_grad_norm!r}")
    if clip_mode not in ("two_pass", "previous"):
        raise ValueError(f"clip_mode must be 'two_pass' or 'previous', got {clip_mode!r}")
    if optimizer in _ACTIVE:
        raise RuntimeError(
            "step_in_backward is already active on this optimizer; remove() its handle first (two handles "
            "would update every parameter twice)"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(_is_dtensor(p) for p in params):
        raise RuntimeError(
            "step_in_backward does not support DTensor (FSDP2) parameters: FSDP2 sets the sharded gradient after "
            "its reduce-scatter, outside autograd's accumulation, so the per-parameter hooks would never see it; "
            "use the ordinary loop (SM3 supports FSDP2 there)"
        )
    if _world_size() > 1:
        raise RuntimeError(
            f"step_in_backward does not support a process group of {_world_size()} processes: under DDP the "
            "per-parameter hooks fire before the gradient is all-reduced, so each process would update with its "
            "own gradient and the replicas would diverge; use the ordinary loop"
        )
    return StepInBackward(optimizer, clip_grad_norm=clip_grad_norm, clip_mode=clip_mode)
