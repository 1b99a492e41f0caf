"""The optimizers a plan compares, what each row is in words, and the memory of the update that really runs.

State and update temporaries are traced (see :mod:`memfit.plan._trace`) on the implementation the user's
``optimizer.step()`` takes on the planned device: torch's optimizers take their for-loop path on CPU and their
``foreach`` path on CUDA (the defaults of ``torch.optim``), and :class:`memfit.optim.SM3` takes its fused CPU
kernel (:mod:`memfit.optim._sm3_fused`) wherever a C++ compiler works. A compiled kernel cannot run on fake
tensors, so its memory is modelled from its source, exactly:

- the state is the same as the eager path's (traced: accumulators, momentum buffer, step);
- the kernel allocates a ``(6,)`` float32 hyperparameter tensor and, per distinct column count ``C`` among the
  tensors it takes, a float32 scratch of ``threads * C + 1`` (per-thread column maxima; a rank <= 1 tensor
  counts as ``C = 1``), all alive until the step ends;
- tensors it does not take (rank >= 3, not float32, non-contiguous) go to the eager ``foreach`` kernel in the
  same call, with the scratch still alive: their temporaries are traced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memfit.memory import track
from memfit.optim import SM3, CountSketchAdam
from memfit.plan._trace import Env

__all__ = [
    "OPTIMIZERS",
    "ParamUpdates",
    "UpdateTrace",
    "make_optimizer",
    "settings",
    "trace_param_updates",
    "trace_update",
]

OPTIMIZERS: dict[str, str] = {
    "adam": "torch.optim.Adam",
    "adagrad": "torch.optim.Adagrad",
    "adafactor": "torch.optim.Adafactor",
    "sm3": "memfit.optim.SM3, no momentum",
    "sm3-m0.9": "memfit.optim.SM3, momentum 0.9 (SM3()'s default) in the parameters' dtype",
    "sm3-bf16": "memfit.optim.SM3, momentum 0.9 in bfloat16",
    "countsketch": "memfit.optim.CountSketchAdam",
}

# SM3 keyword arguments of each SM3 row (momentum, momentum dtype).
_SM3_ARGS: dict[str, dict[str, Any]] = {
    "sm3": {"momentum": 0.0},
    "sm3-m0.9": {"momentum": 0.9},
    "sm3-bf16": {"momentum": 0.9, "momentum_dtype": torch.bfloat16},
}
_DEFAULT_LR = {"adam": 1e-3, "adagrad": 1e-2, "adafactor": 1e-2, "countsketch": 1e-3}


def make_optimizer(name: str, params: Any, lr: float | None = None, **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer by its name in :data:`OPTIMIZERS` (``lr``: its usual default when ``None``).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name in _SM3_ARGS:
        return SM3(params, lr=0.1 if lr is None else lr, **{**_SM3_ARGS[name], **kwargs})
    rate = _DEFAULT_LR.get(name, 0.0) if lr is None else lr
    if name == "adam":
        return torch.optim.Adam(params, lr=rate, **kwargs)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=rate, **kwargs)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=rate, **kwargs)
    if name == "countsketch":
        return CountSketchAdam(params, lr=rate, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def _sm3_fused(device: torch.device) -> bool:
    from memfit.optim._sm3_fused import fused_supported

    return fused_supported(device)


def settings(name: str, device: torch.device, param_dtype: torch.dtype) -> str:
    """The row's optimizer in words: class, momentum, state dtype, the update path that runs on ``device``."""
    dt = _dtype_name(param_dtype)
    if name in _SM3_ARGS:
        args = _SM3_ARGS[name]
        mom = (
            "momentum 0"
            if not args["momentum"]
            else (f"momentum {args['momentum']} in {_dtype_name(args.get('momentum_dtype') or param_dtype)}")
        )
        path = (
            f"fused CPU kernel ({torch.get_num_threads()} threads)"
            if device.type == "cpu" and _sm3_fused(device)
            else "foreach"
        )
        acc = "fp64" if param_dtype is torch.float64 else "fp32"
        return f"SM3-II, {mom}, {acc} accumulators, {path}"
    path = "foreach" if device.type == "cuda" else "for-loop"
    if name == "adam":
        return f"Adam, betas (0.9, 0.999), {dt} moments, {path}"
    if name == "adagrad":
        return f"Adagrad, {dt} sums, {path}"
    if name == "adafactor":
        return f"Adafactor, factored {dt} second moment, no momentum, {path}"
    return f"CountSketchAdam, {dt} sketches"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


@dataclass
class UpdateTrace:
    """An optimizer's state and the peak of its ``step()`` with every gradient resident.

    Attributes:
        state_bytes: bytes of the optimizer state after the first step.
        peak_bytes: peak of the second step (parameters, buffers, gradients, state, temporaries).
        breakdown: bytes by tracker category at that peak.
        seconds: predicted time of the step at calibrated rates (0 without rates).
        note: how the figures were obtained, when not by a plain trace.
    """

    state_bytes: int
    peak_bytes: int
    breakdown: dict[str, int]
    seconds: float
    note: str = ""
    state_by_shape: dict[tuple[Any, ...], int] | None = None


def _state_by_shape(opt: torch.optim.Optimizer) -> dict[tuple[Any, ...], int]:
    """Bytes of state per parameter, keyed by the parameter's (shape, dtype)."""
    out: dict[tuple[Any, ...], int] = {}
    for p, s in opt.state.items():
        nbytes = sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
        out[(tuple(p.shape), p.dtype)] = nbytes
    return out


def trace_update(env: Env, name: str, model: nn.Module, *, grad_scaler: bool = False) -> UpdateTrace:
    """Trace ``name``'s update on ``model`` (``meta`` parameters) with all gradients resident.

    One ``step()`` makes the state; the second runs under :func:`memfit.memory.track` (what every step after the
    first allocates). ``grad_scaler``: the step goes through a ``torch.amp.GradScaler`` (unscale, inf check).
    The update runs on ``meta`` twins rather than fake tensors on ``env.device`` (ten times faster per op): an
    optimizer's ops do not depend on the device beyond the for-loop / foreach / fused choice, which is made
    here as the real step makes it on ``env.device``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = name in _SM3_ARGS and env.device.type == "cpu" and _sm3_fused(env.device)
    kwargs: dict[str, Any] = {}
    if name in _SM3_ARGS:
        kwargs["fused"] = False  # traced on fake tensors: the eager kernels; the fused one is modelled below
    elif name != "countsketch":
        # torch.optim picks foreach by the parameters' type, which a FakeTensor is not: say what it would pick
        kwargs["foreach"] = env.device.type == "cuda"
    with env.scalars():
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = make_optimizer(name, params, **kwargs)
        scaler = torch.amp.GradScaler(env.device.type) if grad_scaler else None
        if scaler is not None:
            scaler._scale = torch.ones((), device="meta")  # what the first scale() makes
            scaler._growth_tracker = torch.zeros((), dtype=torch.int32, device="meta")

        def step() -> None:
            if scaler is None:
                opt.step()
            else:
                # what scaler.step(opt) does when no gradient overflowed (the stand-in .item() of the trace
                # cannot say "no inf": it answers 1): unscale, check, step; then the scale update
                scaler.unscale_(opt)
                opt.step()
                scaler.update()

        try:
            step()
            if fused:
                fused_trace = _fused_sm3_update(env, name, model, opt, params)
                fused_trace.state_by_shape = _state_by_shape(opt)
                return fused_trace
            with track(model, opt) as t, env.timed() as cost:
                step()
        finally:
            for p in params:
                p.grad = None
    rep = t.report
    return UpdateTrace(
        state_bytes=rep.baseline_breakdown["optimizer_state"],
        peak_bytes=rep.total_peak_bytes,
        breakdown=dict(rep.peak_breakdown),
        seconds=cost.seconds if cost is not None else 0.0,
        state_by_shape=_state_by_shape(opt),
    )


@dataclass
class ParamUpdates:
    """The update of one parameter at a time, as :func:`memfit.optim.step_in_backward` runs it in the backward.

    Attributes:
        temporaries: bytes the update of a parameter allocates and frees (beyond its parameter, gradient and
            state), keyed by the parameter's ``(shape, dtype)``.
        seconds: predicted time of one such update at calibrated rates (0 without rates), by the same key.
        state_by_shape: bytes of state per parameter, by the same key.
    """

    temporaries: dict[tuple[Any, ...], int]
    seconds: dict[tuple[Any, ...], float]
    state_by_shape: dict[tuple[Any, ...], int]

    def state_bytes(self, params: Sequence[torch.Tensor]) -> int:
        """The optimizer state of ``params`` (parameters of any model with these shapes)."""
        return sum(self.state_by_shape.get(param_key(p), 0) for p in params)

    def total_seconds(self, params: Sequence[torch.Tensor]) -> float:
        """Time of the updates of ``params``, one call per parameter."""
        return sum(self.seconds.get(param_key(p), 0.0) for p in params)


def param_key(p: torch.Tensor) -> tuple[Any, ...]:
    """What a parameter's state and update temporaries depend on: its shape and dtype."""
    return (tuple(p.shape), p.dtype)


def trace_param_updates(env: Env, name: str, model: nn.Module) -> ParamUpdates:
    """Trace ``name``'s update of each parameter shape of ``model`` (``meta`` parameters) on its own.

    What the hook of :func:`memfit.optim.step_in_backward` runs: the user's optimizer with its ``param_groups``
    narrowed to the one parameter (as ``memfit.optim._in_backward.StepInBackward._update`` does), on the path
    that call takes (torch's for-loop on CPU / foreach on CUDA; SM3's fused CPU kernel, modelled as in
    :func:`trace_update`). One full step makes the state first; a parameter's update then allocates only its
    temporaries, while its gradient is live. The same shape and dtype give the same update: traced once.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = name in _SM3_ARGS and env.device.type == "cpu" and _sm3_fused(env.device)
    kwargs: dict[str, Any] = {}
    if name in _SM3_ARGS:
        kwargs["fused"] = False
    elif name != "countsketch":
        kwargs["foreach"] = env.device.type == "cuda"
    temporaries: dict[tuple[Any, ...], int] = {}
    seconds: dict[tuple[Any, ...], float] = {}
    with env.scalars():
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            opt = make_optimizer(name, params, **kwargs)
            opt.step()  # the state, as after the first step
            groups = opt.param_groups
            group_of = {id(q): g for g in groups for q in g["params"]}
            for p in params:
                key = param_key(p)
                if key in temporaries:
                    continue
                if fused:
                    one = _fused_sm3_update(env, name, model, opt, [p])
                    temporaries[key] = one.breakdown["temporaries"]
                    seconds[key] = one.seconds
                    continue
                group = group_of[id(p)]
                held = group["params"]
                group["params"], opt.param_groups = [p], [group]
                try:
                    with track(None, opt) as t, env.timed() as cost:
                        opt.step()
                finally:
                    group["params"], opt.param_groups = held, groups
                temporaries[key] = max(t.report.peak_bytes, 0)
                seconds[key] = cost.seconds if cost is not None else 0.0
        finally:
            for p in params:
                p.grad = None
    return ParamUpdates(temporaries, seconds, _state_by_shape(opt))


def _fused_sm3_update(
    env: Env, name: str, model: nn.Module, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> UpdateTrace:
    """The fused CPU SM3 step's memory and time, modelled from :mod:`memfit.optim._sm3_fused` (module docstring)."""
    from memfit.optim._sm3_fused import _eligible  # the kernel's own rule for which tensors it takes

    state = opt.state
    threads = max(torch.get_num_threads(), 1)
    cols: set[int] = set()
    rest: list[torch.Tensor] = []
    fused_bytes_moved = 0
    for p in params:
        buf = state[p].get("momentum_buffer")
        assert p.grad is not None
        if _eligible(p, p.grad, buf):
            cols.add(1 if p.dim() <= 1 else int(p.shape[1]))
            # read g and w, write w; read and write m (the accumulators are O(rows + cols))
            per = 3 * p.element_size() + (0 if buf is None else 2 * buf.element_size())
            fused_bytes_moved += p.numel() * per
        else:
            rest.append(p)
    temporaries = 6 * 4 + sum((threads * c + 1) * 4 for c in cols)
    rest_temp, rest_seconds = 0, 0.0
    if rest:
        extra = make_optimizer(name, rest, fused=False)
        extra.step()  # its own state, so that the tracked step is a second step
        with track(None, extra) as t, env.timed() as cost:
            extra.step()
        rest_temp = t.report.total_peak_bytes - sum(t.report.baseline_breakdown.values())
        rest_seconds = cost.seconds if cost is not None else 0.0
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    breakdown = {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
        "gradients": sum(p.numel() * p.element_size() for p in params),
        "optimizer_state": state_bytes,
        "temporaries": temporaries + rest_temp,
    }
    seconds = 0.0
    if env.rates is not None:
        r = env.rates
        seconds = (
            fused_bytes_moved / r.bytes_per_s
            + (len(params) - len(rest)) * 10 * r.op_overhead_s
            + rest_seconds
        )
    return UpdateTrace(
        state_bytes=state_bytes,
        peak_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        seconds=seconds,
        note=f"fused SM3 kernel modelled: scratch {threads} threads x columns + hyperparameters",
    )
