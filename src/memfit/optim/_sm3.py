"""The SM3 optimizer class: hyperparameter checks, lazy state, checkpoints; the math is in ``_sm3_math``."""

from __future__ import annotations

import numbers
import sys
import warnings
from collections.abc import Iterable
from itertools import chain
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from memfit.optim._nonfinite import (
    NONFINITE_POLICIES,
    NonFiniteGradientError,
    NonFinitePolicy,
    nonfinite_groups,
    offenders,
)
from memfit.optim._sm3_kernels import run
from memfit.optim._sm3_math import SM3Batch, SM3Hyper, Variant, accumulator_dtype

__all__ = ["SM3", "SM3SetupError"]


class SM3SetupError(ValueError, RuntimeError):
    """Options or parameters SM3 cannot run with (``fused=True`` off CPU, ``foreach`` and ``fused``, complex).

    Both a ``ValueError`` (memfit's type for a bad argument) and a ``RuntimeError`` (what ``torch.optim``
    raises in these cases), so code written against either catches it.
    """


#: Version of the layout of :meth:`SM3.state_dict` (house rule 14). Bump it when the state changes shape.
SM3_STATE_FORMAT = 1
_FORMAT_KEY = "memfit_sm3_format"


def _is_dtensor(t: Tensor) -> bool:
    # DTensor parameters (FSDP2, tensor parallel) take memfit.distributed's sharded kernel. No DTensor can
    # exist before torch.distributed.tensor is imported, so plain users pay neither the import nor the check.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _fused_available(device: torch.device) -> bool:
    from memfit.optim._sm3_fused import fused_supported

    return fused_supported(device)


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SM3: {name} must be a real number, got {type(value).__name__} {value!r}")


def _check_lr(lr: object) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"SM3: Tensor lr must be 1-element: a tensor lr must hold one floating-point value, got "
                f"shape {tuple(lr.shape)} dtype {lr.dtype}"
            )
        if lr.requires_grad:
            raise ValueError("SM3: a tensor lr must not require grad (differentiable steps are unsupported)")
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"SM3: lr must be a float or a 1-element tensor, got {type(lr).__name__} {lr!r}")
    if not float(lr) >= 0.0:
        raise ValueError(f"SM3: lr must be >= 0, got {float(lr)}")


class SM3(Optimizer):
    r"""SM3: Adagrad-like per-coordinate step sizes with optimizer state sublinear in the parameter count.

    For a parameter of shape ``(n_1, .., n_p)``, ``p >= 2``, SM3 keeps one accumulator vector ``a_k`` of
    length ``n_k`` per axis (the cover by codimension-one slices), all starting at 0. With gradient ``g``:

    - SM3-II (default): ``nu = min_k a_k + g^2`` (broadcast), then ``a_k <- max of nu over all axes but k``.
      With ``beta2 < 1``: ``nu = beta2 * min_k a_k + (1 - beta2) * g^2`` and ``a_k`` is *assigned* the max,
      so accumulators can shrink.
    - SM3-I: ``a_k <- a_k + max of g^2 over all axes but k``, then ``nu = min_k a_k``.
    - Rank 0 and 1: one full accumulator, i.e. exact diagonal Adagrad (``nu = a + g^2``, ``a <- nu``).
    - ``u = g / sqrt(nu + eps)``, and ``0`` where ``nu == 0``;
      ``m <- momentum * m + (1 - momentum) * u`` (no bias correction); ``w <- w * (1 - lr * wd) - lr * m``.
      With ``momentum == 0``: ``w <- w - lr * u`` and no momentum buffer is allocated.

    Sparse gradients (``nn.Embedding(sparse=True)``, hybrid COO with ``sparse_dim() == 1``) are coalesced and
    update only the touched rows with the row accumulator ``a_1``; the other rows' state is untouched and
    the table is never densified. There is no momentum on that path, and ``beta2 < 1`` decays only the
    touched rows' accumulators (warned once per optimizer).

    Non-finite gradients (``nonfinite``): ``"raise"`` (default) raises :class:`NonFiniteGradientError`
    before anything is written; ``"skip"`` leaves the param group's parameters and state (step count
    included) as they were and warns; ``"propagate"`` lets NaN reach the parameters. The same on every
    path (for-loop, foreach, fused, DTensor). Cost: one sum per gradient and one host sync per step.

    Distributed: works as is under DDP and ``ZeroRedundancyOptimizer``; DTensor parameters (FSDP2
    ``fully_shard``) keep DTensor state and take :mod:`memfit.distributed._dtensor`'s sharded step (one
    max-all-reduce per parameter, bitwise equal to the single-process step); see ``docs/distributed.md``.

    Memory: ``4 * sum_k n_k`` bytes per float32 tensor of rank >= 2 (``8 *`` for float64), ``4 * numel``
    for rank <= 1, plus ``numel * itemsize(momentum_dtype)`` when ``momentum > 0``; plus a 4-byte step.

    Args:
        params: iterable of parameters or named parameters, or of param-group dicts.
        lr: learning rate (float, or a 1-element tensor).
        momentum: coefficient of the momentum average in [0, 1); 0 allocates no buffer.
        beta2: 1.0 for the paper's sums of squares; in (0, 1) for an exponential moving average (SM3-II).
        eps: >= 0, added to nu under the square root (0 is allowed: coordinates with nu == 0 do not move).
        variant: ``"II"`` (default, tighter) or ``"I"``.
        weight_decay: decoupled weight decay (``w <- w * (1 - lr * weight_decay)``), >= 0.
        maximize: maximize the objective instead of minimizing it.
        momentum_dtype: dtype of the momentum buffer (e.g. ``torch.bfloat16`` for half the bytes);
            ``None`` uses the parameter's dtype.
        foreach: batch the elementwise work with ``torch._foreach`` ops (default: on when not fused).
        fused: one compiled sweep per tensor (``memfit.optim._sm3_fused``). ``None`` (default) uses it on
            CPU where a C++ compiler works (compiled once, then cached on disk by inductor), for float32
            parameters of rank <= 2 with dense gradients; every other tensor (and CUDA) takes the eager
            ``foreach`` path, which computes the same equations with the same roundings. ``False`` never
            compiles anything; ``True`` raises where the kernel cannot run.
        nonfinite: what a step does with a NaN or inf gradient entry: ``"raise"``, ``"skip"`` or
            ``"propagate"`` (see above).

    Raises:
        ValueError: on a hyperparameter out of range (the message holds the value and the allowed range),
            or ``beta2 < 1`` with ``variant="I"``.
        TypeError: a hyperparameter that is not a number (``lr="0.1"``).
        SM3SetupError: both ``foreach=True`` and ``fused=True``; ``fused=True`` with a parameter the kernel
            cannot take (not on CPU, not floating point, no C++ compiler); a complex parameter (here or in
            :meth:`add_param_group`).

    References:
        Anil, Gupta, Koren, Singer. Memory-Efficient Adaptive Optimization. NeurIPS 2019, arXiv:1901.11150.
        Reference implementations: google-research ``sm3/sm3.py`` (TensorFlow) and optax ``scale_by_sm3``.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = SM3(model.parameters(), lr=0.1, momentum=0.9, fused=False)
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.1,
        *,
        momentum: float = 0.9,
        beta2: float = 1.0,
        eps: float = 1e-30,
        variant: Variant = "II",
        weight_decay: float = 0.0,
        maximize: bool = False,
        momentum_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        _check_lr(lr)
        for name, value in (
            ("momentum", momentum),
            ("beta2", beta2),
            ("eps", eps),
            ("weight_decay", weight_decay),
        ):
            _check_real(name, value)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SM3: momentum must be in [0, 1), got {momentum}")
        if not 0.0 < beta2 <= 1.0:
            raise ValueError(f"SM3: beta2 must be in (0, 1], got {beta2}")
        if not eps >= 0.0:
            raise ValueError(f"SM3: eps must be >= 0, got {eps}")
        if variant not in ("I", "II"):
            raise ValueError(f"SM3: variant must be 'I' or 'II', got {variant!r}")
        if variant == "I" and beta2 != 1.0:
            raise ValueError(
                f"SM3: beta2={beta2} < 1 (exponential moving average) is defined for variant='II' only; "
                "use variant='II' or beta2=1.0"
            )
        if not weight_decay >= 0.0:
            raise ValueError(f"SM3: weight_decay must be >= 0, got {weight_decay}")
        if momentum_dtype is not None and (
            not isinstance(momentum_dtype, torch.dtype) or not momentum_dtype.is_floating_point
        ):
            raise ValueError(
                f"SM3: momentum_dtype must be a floating-point torch.dtype or None, got {momentum_dtype!r}"
            )
        if foreach and fused:
            raise SM3SetupError(
                "SM3: `fused` and `foreach` cannot be `True` together: foreach=True and fused=True are "
                "exclusive; pick one"
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"SM3: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "beta2": beta2,
            "eps": eps,
            "variant": variant,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "momentum_dtype": momentum_dtype,
            "foreach": foreach,
            "fused": fused,
            "nonfinite": nonfinite,
        }
        self._warned_sparse = False
        #: Param-group steps skipped for a non-finite gradient (``nonfinite="skip"``).
        self.nonfinite_skips = 0
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, refusing what SM3 cannot train (complex; ``fused=True`` off CPU).

        Raises:
            SM3SetupError: a complex parameter, or ``fused=True`` with a parameter the kernel cannot take.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.is_complex():
                    raise SM3SetupError(
                        f"SM3 does not support complex parameters (got dtype {p.dtype}): it would train the "
                        "real part only; optimize torch.view_as_real(p) instead"
                    )
                if group["fused"]:
                    self._check_fused(p)
        except SM3SetupError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_fused(p: Tensor) -> None:
        if not (p.device.type == "cpu" and p.is_floating_point() and _fused_available(p.device)):
            raise SM3SetupError(
                "SM3: `fused=True` requires all the params to be floating point Tensors of supported "
                f"devices: ['cpu'] with a working C++ compiler (torch.compile's inductor), but {p.dtype} "
                f"and {p.device.type}. Use fused=None (falls back to foreach) or fused=False."
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Back-fill options added after a checkpoint was written, so old pickles and state dicts load.
        super().__setstate__(state)
        self.__dict__.setdefault("_warned_sparse", False)
        self.__dict__.setdefault("nonfinite_skips", 0)
        for group in self.param_groups:
            group.setdefault("momentum", 0.9)
            group.setdefault("beta2", 1.0)
            group.setdefault("eps", 1e-30)
            group.setdefault("variant", "II")
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)
            group.setdefault("momentum_dtype", None)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("nonfinite", "raise")
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)

    # ------------------------------------------------------------------ state
    def _new_state(self, p: Tensor) -> dict[str, Tensor]:
        acc_dtype = accumulator_dtype(p.dtype)
        state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        if _is_dtensor(p):
            from memfit.distributed._dtensor import new_sm3_state

            return new_sm3_state(p, state["step"])  # type: ignore[arg-type]
        if p.dim() <= 1:
            state["accumulator"] = torch.zeros_like(p, dtype=acc_dtype, memory_format=torch.preserve_format)
        else:
            for k, n in enumerate(p.shape):
                shape = [1] * p.dim()
                shape[k] = n
                state[f"accumulator_{k}"] = torch.zeros(shape, dtype=acc_dtype, device=p.device)
        return state

    @staticmethod
    def _accumulators(p: Tensor, state: dict[str, Tensor]) -> list[Tensor]:
        if p.dim() <= 1:
            return [state["accumulator"]]
        return [state[f"accumulator_{k}"] for k in range(p.dim())]

    def _init_group(self, group: dict[str, Any], batch: SM3Batch, steps: list[Tensor]) -> None:
        """Fill ``batch`` and ``steps`` with the group's parameters that have gradients, their state (allocated
        lazily) and their step counters. Appends to lists it is given (what torch.compile traces best)."""
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state.update(self._new_state(p))
            if p.grad.is_sparse:
                self._warn_sparse(group)
            buf: Tensor | None = None
            if group["momentum"] > 0.0 and not p.grad.is_sparse:
                # Allocated on the first dense step only: sparse-only parameters never carry a buffer.
                if "momentum_buffer" not in state:
                    dtype = group["momentum_dtype"] or p.dtype
                    state["momentum_buffer"] = torch.zeros_like(
                        p, dtype=dtype, memory_format=torch.preserve_format
                    )
                buf = state["momentum_buffer"]
            batch.params.append(p)
            batch.grads.append(p.grad)
            batch.accumulators.append(self._accumulators(p, state))
            batch.momentum_buffers.append(buf)
            steps.append(state["step"])

    def _warn_sparse(self, group: dict[str, Any]) -> None:
        if self._warned_sparse or (group["momentum"] == 0.0 and group["beta2"] == 1.0):
            return
        self._warned_sparse = True
        lost = []
        if group["momentum"] != 0.0:
            lost.append(
                f"momentum={group['momentum']} is not applied to them (it applies to dense gradients)"
            )
        if group["beta2"] != 1.0:
            lost.append(
                f"beta2={group['beta2']} decays only the accumulators of the rows that have a gradient in a "
                "step (the TensorFlow reference's sparse update)"
            )
        warnings.warn(
            f"SM3: sparse gradients: {'; '.join(lost)}. Warned once per optimizer.",
            UserWarning,
            stacklevel=6,
        )

    def _use_fused(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group["fused"] is False or group["foreach"]:
            return False
        if torch.compiler.is_compiling():
            # Under torch.compile(opt.step) the outer compiler fuses the eager kernels itself.
            return False
        if group["fused"]:
            for p in params:  # parameters may have moved since the constructor checked them
                self._check_fused(p)
            return True
        return all(_fused_available(p.device) for p in params)

    def _skip_nonfinite(self) -> set[int]:
        """The param groups to skip this step; raises first if a ``"raise"`` group has a non-finite gradient."""
        bad = [i for i, flag in enumerate(nonfinite_groups(self.param_groups)) if flag]
        if not bad:
            return set()
        raising = [i for i in bad if self.param_groups[i]["nonfinite"] == "raise"]
        if raising:
            raise NonFiniteGradientError(
                "SM3", [o for i in raising for o in offenders(self.param_groups[i], i)]
            )
        self.nonfinite_skips += len(bad)
        warnings.warn(
            "SM3: skipped a step of a param group with a non-finite gradient (nonfinite='skip'); "
            "optimizer.nonfinite_skips counts them",
            RuntimeWarning,
            stacklevel=5,
        )
        return set(bad)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One SM3 step of every param group (see the class docstring for the equations).

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            NonFiniteGradientError: a gradient holds NaN or inf in a group with ``nonfinite="raise"``;
                nothing was updated.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = self._skip_nonfinite()
        for index, group in enumerate(self.param_groups):
            if index in skip:
                continue
            batch, steps = SM3Batch([], [], [], []), cast(list[Tensor], [])
            self._init_group(group, batch, steps)
            if not len(batch.params):
                continue
            if torch.compiler.is_compiling():
                for s in steps:
                    s.add_(1)
            else:
                torch._foreach_add_(steps, 1.0)
            hp = SM3Hyper.from_group(group)
            sharded = [i for i, p in enumerate(batch.params) if _is_dtensor(p)]
            if sharded:
                from memfit.distributed._dtensor import sm3_dtensor

                sm3_dtensor(batch.select(sharded), hp)
                batch = batch.select(sorted(set(range(len(batch.params))) - set(sharded)))
                if not len(batch.params):
                    continue
            fused = self._use_fused(group, batch.params)
            run(batch, hp, foreach=not fused and group["foreach"] is not False, fused=fused)
        return loss

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus a format version (``"memfit_sm3_format"``)."""
        sd = super().state_dict()
        sd[_FORMAT_KEY] = SM3_STATE_FORMAT
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping accumulators in float32/float64 whatever the parameter dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype (a bf16 model
        would get bf16 accumulators and lose them to rounding); here each state tensor is re-made, as an
        independent copy, from the saved value in the dtype SM3 allocates for it: accumulators in
        :func:`accumulator_dtype`, the momentum buffer in the group's ``momentum_dtype`` (or the parameter's
        dtype). torch's hook contract holds: the registered load-state-dict pre-hooks see (and may replace)
        the state dict before anything is read from it, and the post-hooks run after SM3's re-making, so
        what a post-hook writes stays.

        Raises:
            ValueError: the state dict (as the pre-hooks leave it) was written by a newer memfit.
        """
        loaded: dict[str, Any] = {}

        def last_pre_hook(_: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
            version = sd.get(_FORMAT_KEY, SM3_STATE_FORMAT)
            if not isinstance(version, int) or version > SM3_STATE_FORMAT:
                raise ValueError(
                    f"SM3: state dict format {version!r} is newer than this memfit understands "
                    f"(<= {SM3_STATE_FORMAT}); upgrade memfit to load it"
                )
            loaded["state_dict"] = sd
            return {k: v for k, v in sd.items() if k != _FORMAT_KEY}

        def first_post_hook(_: Optimizer) -> None:
            self._restore_state_dtypes(loaded["state_dict"])

        # Registered for this call only: last among the pre-hooks, first among the post-hooks.
        pre = self.register_load_state_dict_pre_hook(last_pre_hook)
        post = self.register_load_state_dict_post_hook(first_post_hook, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params, strict=False))
        groups_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, saved in cast(Iterable[tuple[Any, dict[str, Any]]], state_dict["state"].items()):
            p = id_to_param.get(pid)
            if p is None:
                continue
            group = groups_of[id(p)]
            for key, value in saved.items():
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    continue
                if key == "step":  # torch keeps the given tensor: two loads would count each other's steps
                    self.state[p][key] = self.state[p][key].clone()
                    continue
                if key == "momentum_buffer":
                    dtype = group["momentum_dtype"] or p.dtype
                else:
                    dtype = accumulator_dtype(p.dtype)
                self.state[p][key] = value.detach().to(device=p.device, dtype=dtype, copy=True)
