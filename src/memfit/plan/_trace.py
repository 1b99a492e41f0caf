"""Tracing a training step without data: fake tensors on the device the step is planned for.

Every figure of a plan that is not a model of a compiled kernel is a *trace*: the step's own Python code runs
with :class:`torch._subclasses.fake_tensor.FakeTensor` parameters and batch, which carry a shape, a dtype and a
device (``cpu`` or ``cuda``) but no data, under :func:`memfit.memory.track`. The same ATen ops run in the same
order as on the real device — autocast casts, the SDPA kernel the device would pick, the optimizer's for-loop or
foreach path — so the tracker's peak is the peak the real step reaches, and nothing is allocated.

Two dispatch modes help:

- :class:`_Scalars`: ``.item()`` (``aten._local_scalar_dense``) cannot read a fake tensor. Optimizers read their
  step count with it (``torch.optim.Adafactor``), a ``GradScaler`` its ``found_inf``, HF models check their
  attention masks. The mode answers 1 for floats and integers and ``True`` for booleans: the value steers
  arithmetic, never which tensors are made (the memory of the step does not depend on it).
- :class:`_Cost`: the time of each op at calibrated rates (:class:`memfit.remat.Rates`): its FLOPs (torch's
  flop-counter formulas) at the matmul rate, the bytes it reads and writes at the memory bandwidth (a random op's
  draws, an advanced-indexing op's elements at their own rates), large outputs' fresh pages, plus a dispatch
  overhead — the cost model :func:`memfit.remat.capture` gives each graph node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from memfit._compat import TorchDispatchMode, fake_tensor_mode, op_returns_alias
from memfit.memory import MemoryReport, track
from memfit.remat.eager.costs import (
    CPU_ATTENTION,
    GROUPED_MATMULS,
    element_seconds,
    fresh_page_seconds,
    op_flops,
)

__all__ = ["Env", "StepTrace", "trace_forward_backward"]


class _Scalars(TorchDispatchMode):
    """Answers ``.item()`` on fake tensors with a stand-in value (see the module docstring)."""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.dtype is torch.bool:
                return True
            return 1.0 if t.is_floating_point() else 1
        if (
            func is torch.ops.aten._to_copy.default
            and _no_data(args[0])
            and kwargs.get("device") is not None
            and torch.device(kwargs["device"]).type == "cpu"
            and args[0].numel() <= 4096
        ):
            # ``.tolist()`` of a few flags (e.g. an optimizer's all-finite check): real ones, as ``.item()`` above
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


def _no_data(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, torch.Tensor) and (t.device.type == "meta" or isinstance(t, FakeTensor))


class _Cost(TorchDispatchMode):
    """Sums each op's predicted seconds: ``flops / flops_per_s + bytes / bytes_per_s + op_overhead_s``."""

    def __init__(self, rates: Any, flops_by_dtype: dict[torch.dtype, float] | None = None) -> None:
        super().__init__()
        self.rates = rates
        self.flops_by_dtype = flops_by_dtype or {}
        self.seconds = 0.0
        self._views: dict[Any, bool] = {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        view = self._views.get(func)
        if view is None:
            aliases, writes = op_returns_alias(func)
            view = self._views[func] = bool(aliases) and not writes
        r = self.rates
        if view:
            self.seconds += 0.5 * r.op_overhead_s
            return out
        moved = 0
        dtype = None
        for t in pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                moved += t.numel() * t.element_size()
                dtype = dtype or t.dtype
        flops = op_flops(func, args, kwargs, out)
        # large outputs' fresh pages, a random op's draws, an advanced-indexing op's elements: as the capture prices
        fixed = fresh_page_seconds(out, r, pytree.tree_leaves((args, kwargs))) + r.op_overhead_s
        by_elements = element_seconds(func, args, kwargs, out, r)
        if by_elements is not None:
            self.seconds += flops / r.flops_per_s + by_elements + fixed
            return out
        rate = r.flops_per_s
        packet = getattr(func, "overloadpacket", None)
        if flops and dtype is not None and dtype in self.flops_by_dtype and packet not in CPU_ATTENTION:
            # matmuls at their dtype's measured rate; convolutions at the same ratio to float32 (ResNet-18 under
            # bf16 autocast was predicted at 0.01x of measured with convolutions at the float32 rate); the CPU
            # flash attention at the float32 rate in any dtype (bf16: 19 GFLOP/s against float32's 21 on the
            # machine this was written on, where a bf16 matmul ran at 1.0)
            fp32 = self.flops_by_dtype.get(torch.float32, rate)
            # grouped matmuls run matmuls of the same kind (Hugging Face's fallback calls torch.mm per group)
            if packet in _MATMULS or getattr(packet, "_qualified_op_name", "") in GROUPED_MATMULS:
                rate = self.flops_by_dtype[dtype]
            else:
                rate = rate * self.flops_by_dtype[dtype] / fp32
        self.seconds += flops / rate + moved / r.bytes_per_s + fixed
        return out


_MATMUL_RATES: dict[str, dict[torch.dtype, float]] = {}
# the ops whose rate matmul_rates measures (other FLOPs, e.g. convolutions: calibrate's rate x the dtype's ratio)
_MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


def matmul_rates(device: torch.device, fp32_rate: float) -> dict[torch.dtype, float]:
    """FLOP rates of matmuls by dtype on ``device``, measured on a linear layer's three products (best of 2, once
    per process; ``fp32_rate``, :func:`memfit.remat.calibrate`'s square-matmul rate, is the fallback). CPUs
    without bf16/fp16 matrix units run them 30-300 times slower than float32 (0.1-0.3 GFLOP/s on the machine
    this was written on): an autocast step's time hinges on it."""
    key = str(device)
    if key in _MATMUL_RATES:
        return _MATMUL_RATES[key]
    import time

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    rates = {torch.float32: fp32_rate}
    with torch.random.fork_rng(devices=[]):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            # a linear layer's three products, whose speeds differ by 10x with the operands' layouts here:
            # forward x @ w.T, input gradient g @ w, weight gradient g.T @ x
            x = torch.randn(512, 128, device=device).to(dtype)
            w = torch.randn(256, 128, device=device).to(dtype)
            g = torch.randn(512, 256, device=device).to(dtype)

            def linear(x: torch.Tensor = x, w: torch.Tensor = w, g: torch.Tensor = g) -> None:
                torch.mm(x, w.t())
                torch.mm(g, w)
                torch.mm(g.t(), x)

            rates[dtype] = 3 * 2 * 512 * 128 * 256 / best(linear)
    _MATMUL_RATES[key] = rates
    return rates


@dataclass
class StepTrace:
    """A traced forward + backward (or optimizer update): the tracker's report and the predicted seconds."""

    report: MemoryReport
    seconds: float


class Env:
    """One fake-tensor world for a plan: converts meta modules and batches to fake tensors on ``device``.

    Args:
        device: the device planned for (``"cpu"``, ``"cuda"``, ...). Fake CUDA tensors need no GPU.
        rates: the calibrated rates that time each op (``None``: no times).
        meta: trace on plain ``meta`` tensors instead (several times faster per op). Only for models whose ops
            on ``meta`` are the ops they run on ``device`` (memfit's GPT calls the CPU's fused attention kernel
            on ``meta``) and without autocast (which ``meta`` tensors do not take).
    """

    def __init__(self, device: torch.device, rates: Any = None, *, meta: bool = False) -> None:
        self.device = device
        self.rates = rates
        self.meta = meta
        self.mode = fake_tensor_mode()
        # measured here, on real tensors (not under the fake mode of a trace)
        self.flops_by_dtype = matmul_rates(device, rates.flops_per_s) if rates is not None else {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Fake tensors for every factory call, ``.item()`` answered."""
        if self.meta:
            with _Scalars():
                yield
            return
        with self.mode, _Scalars():
            yield

    def module(self, meta_module: nn.Module) -> nn.Module:
        """``meta_module`` with fake parameters and buffers on :attr:`device` (in place; nothing allocated)."""
        if self.meta:
            return meta_module
        # ``to_empty`` makes a new tensor per (module, name): a parameter two modules share (tied embeddings) would
        # come out as two, counted twice with two gradients; tie them again
        tied: dict[int, list[str]] = {}
        for name, t in (
            *meta_module.named_parameters(remove_duplicate=False),
            *meta_module.named_buffers(remove_duplicate=False),
        ):
            tied.setdefault(id(t), []).append(name)
        with self.active():
            out = meta_module.to_empty(device=self.device)
        for names in tied.values():
            if len(names) > 1:
                first = out.get_parameter(names[0]) if _is_param(out, names[0]) else out.get_buffer(names[0])
                for name in names[1:]:
                    owner, _, attr = name.rpartition(".")
                    setattr(out.get_submodule(owner), attr, first)
        return out

    def batch(self, batch: Any) -> Any:
        """A fake twin of ``batch`` (a pytree of real, meta or fake tensors) on :attr:`device`."""
        device = "meta" if self.meta else self.device

        def fake(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)

        with self.active():
            return pytree.tree_map_only(torch.Tensor, fake, batch)

    @contextlib.contextmanager
    def scalars(self) -> Iterator[None]:
        """``.item()`` answered (for ``meta`` tensors)."""
        with _Scalars():
            yield

    @contextlib.contextmanager
    def timed(self) -> Iterator[_Cost | None]:
        if self.rates is None:
            yield None
            return
        with _Cost(self.rates, self.flops_by_dtype) as cost:
            yield cost


def trace_forward_backward(
    env: Env,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    *,
    autocast: torch.dtype | None,
    scale_loss: bool,
    consume_grads: bool = False,
) -> StepTrace:
    """Forward and backward of ``loss_fn(model, batch)`` on fake tensors under :func:`memfit.memory.track`.

    The forward (the loss included) runs under ``torch.autocast`` when ``autocast`` is a dtype; the backward
    outside it, as a user writes it. ``scale_loss``: the loss is multiplied by a scale first (what
    ``GradScaler.scale`` does).

    ``consume_grads``: the backward of :func:`memfit.optim.step_in_backward` without its updates: a
    post-accumulate-grad hook on every parameter marks the timeline (``report.marks``: the parameter's name and
    the point where its final gradient is live, where the update would run) and frees the gradient.

    Raises:
        LossError: ``loss_fn`` raised, or did not return a scalar tensor.
    """
    for p in model.parameters():
        p.grad = None
    handles: list[Any] = []
    with env.active(), track(model, inputs=batch) as t, env.timed() as cost:
        if consume_grads:  # registered after the tracker's own hooks: the gradient is labelled, then freed
            for name, p in model.named_parameters():
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(_consumer(t, name)))
        ctx = (
            torch.autocast(env.device.type, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        )
        try:
            with ctx:
                loss = loss_fn(model, batch)
        except Exception as exc:
            raise LossError(f"loss_fn raised {type(exc).__name__}: {_first_line(exc)}") from exc
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise LossError(f"loss_fn must return a scalar tensor, got {got}")
        if not loss.requires_grad:
            raise LossError(
                "loss_fn returned a tensor that does not require grad (no trainable parameter reached it)"
            )
        if scale_loss:
            loss = loss * torch.full((), 65536.0, device=loss.device)
        try:
            loss.backward()
        finally:
            for h in handles:
                h.remove()
    for p in model.parameters():
        p.grad = None
    return StepTrace(t.report, cost.seconds if cost is not None else 0.0)


def _is_param(module: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in module.get_submodule(owner)._parameters


def _consumer(tracker: Any, name: str) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        tracker.mark(name)
        p.grad = None

    return hook


class LossError(ValueError):
    """``loss_fn`` failed on the planned batch, or returned something other than a scalar tensor."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
