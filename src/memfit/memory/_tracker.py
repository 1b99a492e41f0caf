"""`track()`: record every tensor storage alive in a block of PyTorch code, by category.

How it works (the facts come from reading torch's own ``torch/distributed/_tools/mem_tracker.py``; the code
is written here):

1. A ``TorchDispatchMode`` sees every ATen op the block runs, forward, backward (the autograd engine carries
   the mode into its threads) and optimizer step alike, factory functions included. An op whose schema
   says its outputs are fresh (no alias annotation) has allocated them: each output's *storage* is
   registered once, keyed by the identity of its Python ``UntypedStorage`` object, so views and
   ``.detach()`` share one entry and cost nothing.
2. torch keeps a storage's Python object alive exactly as long as the C++ StorageImpl, so a ``weakref``
   callback on that object fires when the memory is released: that is the free event.
3. Each storage carries one category, its strongest role (see ``CATEGORIES``): parameters, buffers,
   gradients and optimizer state are recognised from the model and optimizer passed in (gradients by a
   post-accumulate-grad hook on every parameter, optimizer state by a step post-hook that scans
   ``optimizer.state``), activations by a ``saved_tensors_hooks`` pack hook (autograd saved it for
   backward), inputs by the user (``inputs=`` / :meth:`Tracker.mark_inputs`); everything else is a
   temporary. A label applies over the storage's whole life, so a gradient buffer is a gradient from the
   backward op that made it, and Adam's moments are optimizer state from the ``zeros_like`` in ``step()``.
4. Per op the mode does O(outputs) work: no scan of the live set. The report (``_report.py``) turns the
   event list into a per-category timeline afterwards.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable, Iterator
from functools import partial
from types import TracebackType
from typing import Any

import torch
from torch import nn

from memfit._compat import (
    TorchDispatchMode,
    inductor_graph_runs,
    is_traceable_wrapper_subclass_type,
    no_python_dispatch,
    op_returns_alias,
)
from memfit.memory._report import CATEGORY_CODE, MemoryReport, build_report

__all__ = ["Tracker", "TrackerError", "track"]

_PARAM = CATEGORY_CODE["parameters"]
_BUFFER = CATEGORY_CODE["buffers"]
_OPT = CATEGORY_CODE["optimizer_state"]
_GRAD = CATEGORY_CODE["gradients"]
_INPUT = CATEGORY_CODE["inputs"]
_ACT = CATEGORY_CODE["activations"]
_TEMP = CATEGORY_CODE["temporaries"]

# What an op's outputs are, read once per op overload from its schema.
_FRESH = 0  # new storages (the common case)
_VIEW = 1  # aliases of an input: nothing allocated
_WRITE = 2  # an input written in place / ``out=``: may have been resized
_LIFT = 3  # ``torch.tensor(...)``: the data was made outside dispatch, this op hands it to us

_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)

# The one tracker that may be active: two dispatch modes both counting the same storages would each
# report half a picture.
_ACTIVE: list[Tracker] = []


class TrackerError(RuntimeError):
    """A ``track()`` block used in a way it cannot measure (nested, re-entered, report read too early)."""


class _Mode(TorchDispatchMode):
    """The dispatch mode: runs each op, then tells the tracker what it allocated."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self._tracker = tracker
        self._subclass_types: dict[tuple[type, ...], bool] = {}

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # Wrapper subclasses (DTensor, ...) desugar into ops on their inner plain tensors, which we see
        # next; counting the wrapper as well would double count. One lookup per op: ``types`` is a
        # short tuple, usually ``(Tensor,)``.
        has_sub = self._subclass_types.get(types)
        if has_sub is None:
            has_sub = self._subclass_types[types] = any(is_traceable_wrapper_subclass_type(t) for t in types)
        if has_sub:
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        tracker = self._tracker
        if not tracker._quiet:
            tracker._on_op(func, out)
        return out

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let ``torch.compile`` compile and run its code under this mode (the mode is off while it compiles). With
        the default (``False``) dynamo skips every frame it meets under a mode and marks it skipped for good: a
        compiled function would run eagerly inside the block *and after it*."""
        return True


class Tracker:
    """Measures live tensor-storage memory of a block by category; use through :func:`track`.

    Args:
        model: the module trained in the block; its parameters, buffers and gradients are recognised.
        optimizer: its optimizer; its state tensors are recognised, also when created lazily in
            ``step()``, and its parameters are treated like the model's.
        inputs: tensors (or nested lists / tuples / dicts of tensors) to count as ``inputs``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``optimizer`` not a ``torch.optim.Optimizer``,
            or ``inputs`` holds something other than tensors.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        inputs: Any = None,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        self._model = model
        self._optimizer = optimizer
        self._inputs = list(_iter_tensors(inputs, "inputs"))
        self._state = "new"  # new -> active -> done
        self._report: MemoryReport | None = None
        # Live storages: id(storage object) -> (weak reference with the free callback, storage id).
        self._live: dict[int, tuple[weakref.ref[torch.UntypedStorage], int]] = {}
        self._sid_bytes: list[int] = []
        self._sid_cat: list[int] = []
        # (timeline point from which the change applies, storage id, byte change)
        self._events: list[tuple[int, int, int]] = []
        # Op identities in order: ``id()`` of the OpOverload (or mark label), because hashing an
        # OpOverload runs a Python ``__hash__``; ``_op_by_id`` keeps each alive and gives its name.
        self._ops: list[int] = []
        self._op_by_id: dict[int, torch._ops.OpOverload | str] = {}
        self._marks: list[tuple[str, int]] = []
        self._quiet = 0  # > 0 while the tracker itself runs an op (not part of the measured block)
        self._n = 0  # ops dispatched so far; allocations of op k apply at point k, frees after it at k+1
        self._op_kind: dict[int, int] = {}
        self._devices: set[str] = set()
        self._baseline_bytes = 0
        self._exiting = False
        self._handles: list[Any] = []
        self._mode: _Mode | None = None
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._cuda_device: int | None = None
        # runs of inductor-compiled graphs in the block (their allocations are invisible to a dispatch mode)
        self._inductor_at_entry = False
        self._graph_runs_ctx: Any = None
        self._graph_runs: list[Any] | None = None
        self._compiled_runs = 0
        self._cuda_entry: int | None = None
        self._cuda_max: int | None = None

    # ------------------------------------------------------------------ public
    @property
    def report(self) -> MemoryReport:
        """The :class:`MemoryReport` of the finished block.

        Raises:
            TrackerError: if the block has not ended yet.
        """
        if self._report is None:
            raise TrackerError(
                f"the report is built when the `with track(...)` block exits; this tracker is {self._state}"
            )
        return self._report

    def mark_inputs(self, *tensors: Any) -> None:
        """Counts the storages of ``tensors`` (nested containers allowed) as ``inputs``.

        A storage this tracker has not seen allocated inside the block is taken to have existed at entry
        and joins the baseline.

        Raises:
            TrackerError: if the block is not running.
            TypeError: if ``tensors`` holds something other than tensors.
        """
        if self._state != "active":
            raise TrackerError(
                f"mark_inputs() is for use inside the `with track(...)` block; tracker is {self._state}"
            )
        for t in _iter_tensors(tensors, "mark_inputs()"):
            self._label(t, _INPUT, baseline_if_new=True)

    def mark(self, label: str) -> int:
        """Adds a named point to the timeline holding the memory of this instant (e.g. ``"backward"``).

        Marks show in ``report.marks`` and as vertical lines in ``report.plot()``; read their breakdown
        with ``report.breakdown_at(report.mark_index(label))``.

        Returns:
            The timeline point of the mark.

        Raises:
            TrackerError: if the block is not running.
            TypeError: if ``label`` is not a string.
        """
        if self._state != "active":
            raise TrackerError(
                f"mark() is for use inside the `with track(...)` block; tracker is {self._state}"
            )
        if not isinstance(label, str):
            raise TypeError(f"mark label must be a str, got {type(label).__name__}")
        # A pseudo-op: its point holds every allocation and every free that happened so far.
        self._n += 1
        name = f"<mark {label}>"
        self._op_by_id[id(name)] = name
        self._ops.append(id(name))
        self._marks.append((label, self._n))
        return self._n

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Tracker:
        if self._state != "new":
            raise TrackerError("a Tracker measures one block; create a new one with track(...) for another")
        if _ACTIVE:
            raise TrackerError(
                "memfit.memory.track() is already active; nested tracking is not supported "
                "(one dispatch mode counts each storage once): end the outer block first"
            )
        _ACTIVE.append(self)
        self._state = "active"
        try:
            params = self._params()
            self._register_baseline(params)
            self._install_hooks(params)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                # Resetting the peak is the only way to read the block's own peak from the allocator.
                self._cuda_device = torch.cuda.current_device()
                self._cuda_entry = torch.cuda.memory_allocated(self._cuda_device)
                torch.cuda.reset_peak_memory_stats(self._cuda_device)
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._saved_hooks.__enter__()
            self._inductor_at_entry = "torch._inductor.output_code" in sys.modules
            if (
                self._inductor_at_entry
            ):  # (importing inductor costs seconds: only when a compiled graph may run)
                self._graph_runs_ctx = inductor_graph_runs()
                self._graph_runs = self._graph_runs_ctx.__enter__()
            self._mode = _Mode(self)
            self._mode.__enter__()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The report is built even when the block raised (an out-of-memory error is when it matters most).
        self._teardown()
        if exc_type is None and self._compiled_runs:
            raise TrackerError(
                f"the block ran {self._compiled_runs} graph(s) compiled by torch.compile's inductor backend; their "
                "kernels allocate memory outside PyTorch's dispatch, where track() cannot see it, so t.report covers "
                "only the code that ran outside them. The function stays compiled. To measure a compiled step, read "
                "torch.cuda.max_memory_allocated() on CUDA or the process's peak RSS on CPU (docs/memory.md); for a "
                "breakdown by category, track the function uncompiled (or compiled with backend='aot_eager')."
            )

    # ------------------------------------------------------------------ internals
    def _teardown(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self._graph_runs_ctx is not None:
            self._compiled_runs = len(self._graph_runs or ())
            self._graph_runs_ctx.__exit__(None, None, None)
            self._graph_runs_ctx = None
        elif (
            self._state == "active"
            and not self._inductor_at_entry
            and "torch._inductor.output_code" in sys.modules
        ):
            self._compiled_runs = (
                1  # inductor was first imported inside the block: it compiled and ran a graph
            )
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._state == "active":
            self._exiting = True  # storages first seen by the exit scan appear at the exit point
            self._scan_model_and_optimizer()
            if self._cuda_device is not None:
                torch.cuda.synchronize(self._cuda_device)
                self._cuda_max = torch.cuda.max_memory_allocated(self._cuda_device) - (self._cuda_entry or 0)
            # Frees from here on are outside the measured block: drop the weak references (and callbacks).
            self._live.clear()
            names = {i: str(f) for i, f in self._op_by_id.items()}
            self._report = build_report(
                n_ops=self._n,
                op_names=[names[f] for f in self._ops],
                event_points=[e[0] for e in self._events],
                event_sids=[e[1] for e in self._events],
                event_deltas=[e[2] for e in self._events],
                sid_category=self._sid_cat,
                baseline_bytes=self._baseline_bytes,
                devices=sorted(self._devices),
                marks=self._marks,
                cuda_max_allocated_bytes=self._cuda_max,
                cuda_entry_allocated_bytes=self._cuda_entry,
            )
            self._state = "done"
        if _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()

    def _params(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        if self._model is not None:
            for p in self._model.parameters():
                seen.setdefault(id(p), p)
        if self._optimizer is not None:
            for group in self._optimizer.param_groups:
                for p in group["params"]:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def _optimizer_state_tensors(self) -> Iterator[torch.Tensor]:
        if self._optimizer is None:
            return
        for state in self._optimizer.state.values():
            yield from _iter_tensors(state, "optimizer.state", strict=False)

    def _register_baseline(self, params: list[nn.Parameter]) -> None:
        for p in params:
            self._label(p, _PARAM, baseline_if_new=True)
        if self._model is not None:
            for b in self._model.buffers():
                self._label(b, _BUFFER, baseline_if_new=True)
        for p in params:
            if p.grad is not None:
                self._label(p.grad, _GRAD, baseline_if_new=True)
        for t in self._optimizer_state_tensors():
            self._label(t, _OPT, baseline_if_new=True)
        for t in self._inputs:
            self._label(t, _INPUT, baseline_if_new=True)

    def _scan_model_and_optimizer(self) -> None:
        # At exit: parameters or buffers created inside the block (lazy modules), gradients written
        # without AccumulateGrad (``p.grad = ...``), state the step hook could not see.
        for p in self._params():
            self._label(p, _PARAM)
            if p.grad is not None:
                self._label(p.grad, _GRAD)
        if self._model is not None:
            for b in self._model.buffers():
                self._label(b, _BUFFER)
        for t in self._optimizer_state_tensors():
            self._label(t, _OPT)

    def _install_hooks(self, params: list[nn.Parameter]) -> None:
        for p in params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_post_hook(self._on_step))

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._label(p.grad, _GRAD)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for t in self._optimizer_state_tensors():
            self._label(t, _OPT)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Autograd saves ``t`` for backward: its storage is an activation (unless it plays a stronger
        # role, e.g. a parameter). Return a detached alias, as the saved_tensors_hooks docs require, so
        # the saved value holds no reference cycle through ``t.grad_fn``.
        try:
            entry = self._live.get(id(t.untyped_storage()))
        except (RuntimeError, NotImplementedError):  # sparse: its index and value tensors hold the bytes
            for part in self._components(t):
                self._pack(part)
            entry = None
        if entry is not None and self._sid_cat[entry[1]] > _ACT:
            self._sid_cat[entry[1]] = _ACT
        # The detach is ours, not the block's: keep it out of the timeline (and, for plain tensors, skip
        # the Python dispatch round trip, ~a sixth of a transformer step's ops).
        if type(t) in _PLAIN_TENSOR_TYPES:
            with no_python_dispatch():
                return t.detach()
        self._quiet += 1
        try:
            return t.detach()
        finally:
            self._quiet -= 1

    def _label(self, t: torch.Tensor, cat: int, *, baseline_if_new: bool = False) -> None:
        """Gives ``t``'s storage the role ``cat`` if stronger than its current one; registers it if new."""
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse (e.g. an embedding's sparse gradient)
            for part in self._components(t):
                self._label(part, cat, baseline_if_new=baseline_if_new)
            return
        entry = self._live.get(id(st))
        if entry is None:
            self._register(st, t, cat, at_entry=baseline_if_new)
        elif cat < self._sid_cat[entry[1]]:
            self._sid_cat[entry[1]] = cat

    def _components(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The strided tensors that hold a sparse tensor's bytes (none for other storage-less layouts)."""
        layout = t.layout
        if layout is torch.sparse_coo:
            getters: tuple[str, ...] = ("_indices", "_values")
        elif layout in (torch.sparse_csr, torch.sparse_bsr):
            getters = ("crow_indices", "col_indices", "values")
        elif layout in (torch.sparse_csc, torch.sparse_bsc):
            getters = ("ccol_indices", "row_indices", "values")
        else:
            return ()
        # These accessors are views: reading them is ours, not an op of the block.
        if type(t) in _PLAIN_TENSOR_TYPES:
            with no_python_dispatch():
                return tuple(getattr(t, g)() for g in getters)
        self._quiet += 1
        try:
            return tuple(getattr(t, g)() for g in getters)
        finally:
            self._quiet -= 1

    def _register(self, st: torch.UntypedStorage, t: torch.Tensor, cat: int, *, at_entry: bool) -> None:
        key = id(st)
        sid = len(self._sid_bytes)
        nbytes = st.nbytes()
        self._sid_bytes.append(nbytes)
        self._sid_cat.append(cat)
        self._live[key] = (weakref.ref(st, partial(self._on_free, key, sid)), sid)
        device = st.device.type  # ~10x cheaper than t.device
        if device == "meta":  # a FakeTensor's storage is meta; the tensor knows the device it stands for
            device = t.device.type
        self._devices.add(device)
        if at_entry:
            self._baseline_bytes += nbytes
        self._events.append((0 if at_entry else self._n + self._exiting, sid, nbytes))

    def _on_free(self, key: int, sid: int, ref: weakref.ref[torch.UntypedStorage]) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[1] == sid:
            del self._live[key]
        self._events.append((self._n + 1, sid, -self._sid_bytes[sid]))

    def _on_op(self, func: torch._ops.OpOverload, out: Any) -> None:
        # Hot path: runs after every ATen op of the block. O(outputs), no scan of the live set; the
        # common case (one fresh plain output) is inlined because a step runs it thousands of times.
        self._n += 1
        fid = id(func)
        self._ops.append(fid)
        kind = self._op_kind.get(fid)
        if kind is None:
            kind = self._op_kind[fid] = _classify(func)
            self._op_by_id[fid] = func
        if kind == _VIEW:
            return
        if isinstance(out, torch.Tensor):
            if kind != _WRITE and out.layout is torch.strided:
                st = out.untyped_storage()
                if id(st) not in self._live:
                    self._register(st, out, _TEMP, at_entry=False)
            else:
                self._see(out, kind)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self._see(o, kind)

    def _see(self, t: torch.Tensor, kind: int) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse outputs
            for part in self._components(t):
                self._see(part, kind)
            return
        entry = self._live.get(id(st))
        if entry is None:
            # A fresh output, or a lifted ``torch.tensor``. An in-place write to a storage we never saw
            # allocated is a tensor that existed before the block: ignored by definition.
            if kind != _WRITE:
                self._register(st, t, _TEMP, at_entry=False)
        elif kind == _WRITE:
            sid = entry[1]
            nbytes = st.nbytes()
            if nbytes != self._sid_bytes[sid]:  # resize_ / out= grew or shrank it
                delta = nbytes - self._sid_bytes[sid]
                self._sid_bytes[sid] = nbytes
                self._events.append((self._n if delta > 0 else self._n + 1, sid, delta))


def _classify(func: torch._ops.OpOverload) -> int:
    if func is torch.ops.aten.lift_fresh.default:
        return _LIFT
    aliases, writes = op_returns_alias(func)
    if writes:
        return _WRITE
    return _VIEW if aliases else _FRESH


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _iter_tensors(obj: Any, what: str, *, strict: bool = True) -> Iterator[torch.Tensor]:
    """Yields the tensors in ``obj`` (a tensor or nested list / tuple / dict of them)."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v, what, strict=strict)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v, what, strict=strict)
    elif strict:
        raise TypeError(
            f"{what} must hold tensors (nested in lists, tuples, dicts); found {type(obj).__name__}"
        )


def track(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    inputs: Iterable[torch.Tensor] | torch.Tensor | None = None,
) -> Tracker:
    """Measures the live tensor memory of a block of code, by category, as totals and a timeline.

    Example::

        with memfit.memory.track(model, opt, inputs=batch) as t:
            loss_fn(model(batch)).backward()
            opt.step()
        print(t.report.table())

    Args:
        model: the module trained in the block (parameters, buffers, gradients are recognised).
        optimizer: its optimizer (state tensors are recognised, also when created in ``step()``).
        inputs: tensors to count as ``inputs`` (or call ``t.mark_inputs(...)`` inside the block).

    Returns:
        A :class:`Tracker` to use as a context manager; ``t.report`` holds the :class:`MemoryReport`
        once the block has exited.

    Raises:
        TypeError: on a ``model`` that is not an ``nn.Module`` or an ``optimizer`` that is not a
            ``torch.optim.Optimizer``.
        TrackerError: (on entry) if another ``track()`` block is active.
    """
    return Tracker(model, optimizer, inputs=inputs)
