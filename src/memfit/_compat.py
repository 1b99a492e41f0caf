"""The one place where memfit reaches private PyTorch APIs (house rule 8).

Everything here is an underscored torch module or an internal that may move between releases. Importing
it through this module means a torch upgrade breaks one place, with a message that says what to fix.
Keep each entry small: a re-export or a thin function with a docstring naming the torch location.

Supported torch range: see ``pyproject.toml`` (CI runs 2.13.0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

# torch/utils/_python_dispatch.py: the base class of ``__torch_dispatch__`` modes, and the test for
# tensor subclasses that wrap inner tensors (DTensor, NestedTensor, ...). Public in spirit (documented in
# the "extending torch" notes) but living in an underscored module.
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
    is_traceable_wrapper_subclass_type,
)

__all__ = [
    "TorchDispatchMode",
    "aot_eager_backend",
    "aot_export_joint",
    "compiling_state",
    "eager_backward_compile",
    "fake_tensor_mode",
    "inductor_graph_runs",
    "inductor_partitioning",
    "inductor_wrapper_peak",
    "is_traceable_wrapper_subclass",
    "is_traceable_wrapper_subclass_type",
    "load_cpp_pybinding",
    "mem_tracker_class",
    "no_python_dispatch",
    "op_returns_alias",
    "post_accumulate_grad_hooks",
]


def post_accumulate_grad_hooks(t: torch.Tensor) -> list[Any]:
    """The hooks ``Tensor.register_post_accumulate_grad_hook`` registered on ``t``, in registration order.

    torch/_tensor.py keeps them in ``t._post_accumulate_grad_hooks`` (an ordered dict; ``None`` before the first
    one); autograd's AccumulateGrad calls each with ``t`` after adding the gradient into ``t.grad``. memfit's eager
    remat step calls them the same way (:mod:`memfit.remat.eager.updates`).
    """
    hooks = getattr(t, "_post_accumulate_grad_hooks", None)
    return list(hooks.values()) if hooks else []


def op_returns_alias(func: torch._ops.OpOverload) -> tuple[bool, bool]:
    """Reads an ATen operator's schema: do its outputs alias an input, and does it write to one?

    ``func._schema`` (torch/_ops.py) is the parsed native_functions.yaml signature; an output annotated
    ``Tensor(a)`` is a view of an input, ``Tensor(a!)`` an input written in place (in-place and ``out=``
    overloads).

    Args:
        func: the operator overload a ``TorchDispatchMode`` receives.

    Returns:
        ``(aliases, writes)``: whether any output carries alias information, and whether any alias
        is a write.
    """
    aliases = False
    writes = False
    for ret in func._schema.returns:
        info = ret.alias_info
        if info is not None:
            aliases = True
            writes = writes or bool(info.is_write)
    return aliases, writes


def no_python_dispatch() -> Any:
    """A context manager under which ops skip every ``__torch_dispatch__`` mode and subclass.

    ``torch._C._DisableTorchDispatch`` (used by torch/utils/_python_dispatch.py). Only for plain tensors:
    a FakeTensor or another Python subclass needs its own dispatch to run at all.
    """
    return torch._C._DisableTorchDispatch()


def mem_tracker_class() -> Any:
    """Returns ``torch.distributed._tools.mem_tracker.MemTracker``, torch's own module-level tracker.

    memfit uses it only as an independent reference in tests.

    Raises:
        RuntimeError: if this torch build has no ``torch.distributed`` or the class moved.
    """
    if not torch.distributed.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; MemTracker needs it")
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as exc:  # moved or renamed in a newer torch
        raise RuntimeError(
            f"torch {torch.__version__}: torch.distributed._tools.mem_tracker.MemTracker not found ({exc})"
        ) from exc
    return MemTracker


def aot_export_joint(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...]
) -> tuple[torch.fx.GraphModule, Any]:
    """Trace ``module(*args) -> (loss,)`` and its backward into one functional aten graph.

    ``torch._functorch.aot_autograd.aot_export_module(..., trace_joint=True)``: make_fx over the functionalized
    module with fake tensors. The graph takes ``(*parameters, *buffers, *args)`` and returns the new values of
    mutated buffers, the loss and the gradients; the returned signature (``GraphSignature``) names each of them.
    """
    from torch._functorch.aot_autograd import aot_export_module

    gm, signature = aot_export_module(module, args, trace_joint=True, output_loss_index=0)
    if not isinstance(gm, torch.fx.GraphModule):
        raise RuntimeError(f"torch {torch.__version__}: aot_export_module returned {type(gm).__name__}")
    return gm, signature


def fake_tensor_mode() -> Any:
    """A new ``torch._subclasses.fake_tensor.FakeTensorMode``: tensors with shapes, dtypes and devices, no data.

    ``mode.from_tensor(t)`` makes a fake twin of a real (or meta) tensor without allocating its data. Real tensors
    may still flow into ops under it (``allow_non_fake_inputs``), e.g. a module's parameters.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def load_cpp_pybinding(argtypes: list[str], source: str) -> Any:
    """Compile C++ ``source`` (a ``kernel(...)`` function) with inductor's toolchain; returns a Python callable.

    ``torch._inductor.codecache.CppPythonBindingsCodeCache.load_pybinding``: builds with the same compiler flags
    and OpenMP as inductor's CPU kernels and caches the shared object on disk (keyed by the source), so only the
    first call on a machine pays the compile.
    """
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    return CppPythonBindingsCodeCache.load_pybinding(argtypes, source)


def inductor_partitioning() -> tuple[Any, Any, Any, Any]:
    """What memfit's compiled path plugs into: ``(compile_fx, inductor_config, CustomPartitionerFn, min_cut)``.

    - ``torch._inductor.compile_fx.compile_fx``: inductor's backend for ``torch.compile`` (AOTAutograd inside).
    - ``torch._inductor.config``: its ``custom_partitioner_fn`` replaces the forward/backward partitioner.
    - ``torch._inductor.custom_graph_pass.CustomPartitionerFn``: the base class such a partitioner must subclass
      (``__call__`` and ``uuid`` for inductor's caches).
    - ``torch._functorch.partitioners.min_cut_rematerialization_partition``: the default partitioner; it honours
      ``node.meta["recompute"]`` (``torch.utils.checkpoint.CheckpointPolicy``) tags, which memfit sets.

    Raises:
        RuntimeError: this torch lacks one of them.
    """
    try:
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.custom_graph_pass import CustomPartitionerFn
    except ImportError as exc:
        raise RuntimeError(
            f"torch {torch.__version__}: memfit's compiled path needs inductor's custom partitioner hook ({exc})"
        ) from exc
    if not hasattr(inductor_config, "custom_partitioner_fn"):
        raise RuntimeError(
            f"torch {torch.__version__}: torch._inductor.config has no custom_partitioner_fn; memfit.remat.backend needs a torch that has it"
        )
    return compile_fx, inductor_config, CustomPartitionerFn, min_cut_rematerialization_partition


def aot_eager_backend(partition_fn: Any) -> Any:
    """A ``torch.compile`` backend that partitions with ``partition_fn`` and runs the fx graphs as they are.

    ``torch._dynamo.backends.common.aot_autograd`` with ``torch._dynamo.backends.debugging.boxed_nop`` compilers
    and inductor's decomposition table (``torch._inductor.compile_fx.select_decomp_table``), as torch's own
    ``aot_eager_decomp_partition`` debugging backend does: the same joint graph inductor would partition, without
    code generation (seconds instead of tens of seconds to compile on a CPU).
    """
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._inductor.compile_fx import select_decomp_table

    return aot_autograd(
        fw_compiler=boxed_nop,
        bw_compiler=boxed_nop,
        decompositions=select_decomp_table(),
        partition_fn=partition_fn,
        keep_inference_input_mutations=True,
    )


def inductor_wrapper_peak(
    source_code: str, arg_bytes: dict[str, int], fallback_itemsize: int = 4
) -> int | None:
    """The peak bytes of one call of an inductor-compiled graph, read from its generated Python wrapper.

    Inductor's wrapper (``CompiledFxGraph.source_code``, torch/_inductor/codegen/wrapper.py) allocates every buffer
    with ``bufN = empty_strided_<device>((sizes), (strides), dtype)``, hands one to another with
    ``bufM = reinterpret_tensor(bufN, ...); del bufN  # reuse``, and frees with ``del a, b``; the graph's inputs
    (``a, b = args``, then ``args.clear()``) are freed by ``del`` after their last use as well. Replaying those
    statements gives the buffer plan's peak: inputs still alive plus allocated buffers. Layout copies (a
    channels-last copy of a convolution's input or weight) are ``empty_strided`` buffers like any other. Tensors a
    fallback kernel returns (``bufN = extern_kernels.convolution(...)``, ``bufN = torch.ops.aten.X.default(...)``,
    and the items ``bufM = bufN[i]`` of a kernel that returns several, as ``convolution_backward`` does) are
    allocated by the kernel: the wrapper checks each with ``assert_size_stride(bufN, sizes, strides, ...)``, which
    gives its extent; the dtype is not written there, so they count ``fallback_itemsize`` bytes an element.

    Args:
        source_code: the wrapper module's source.
        arg_bytes: bytes of each input by name that occupies memory of its own (others count 0).
        fallback_itemsize: bytes per element of a fallback kernel's outputs (the graph's float dtype).

    Returns:
        The peak in bytes, or ``None`` when the source has no ``call`` function of the expected form (another
        torch version's codegen): callers then keep their own estimate.
    """
    import re

    lines = source_code.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if re.match(r"\s*def call\((self, )?args\):", line)), None
    )
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip()) + 4
    alloc = re.compile(r"(\w+) = empty_strided(?:_\w+)?\(\(([^)]*)\), \(([^)]*)\), torch\.(\w+)\)")
    reuse = re.compile(r"(\w+) = (?:reinterpret_tensor\()?(\w+)\b.*; del \2\s+# reuse")
    fallback = re.compile(r"(\w+) = (?:extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(")
    item = re.compile(r"(\w+) = (\w+)\[\d+\]$")
    checked = re.compile(r"assert_size_stride\((\w+), \(([^)]*)\), \(([^)]*)\)")
    pending: set[str] = set()  # fallback outputs whose extent the next assert_size_stride gives
    returned: set[str] = set()  # the (tuple) results of fallback kernels
    live: dict[str, int] = {}
    peak = 0
    total = 0
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        s = line.strip()
        if s.endswith("= args") and "," in s:
            for name in (n.strip() for n in s[: -len("= args")].split(",")):
                if name:
                    live[name] = arg_bytes.get(name, 0)
            total = sum(live.values())
            peak = max(peak, total)
            continue
        m = alloc.match(s)
        if m:
            sizes = [int(x) for x in m.group(2).replace(" ", "").split(",") if x]
            strides = [int(x) for x in m.group(3).replace(" ", "").split(",") if x]
            dtype = getattr(torch, m.group(4), None)
            if dtype is None or len(sizes) != len(strides):
                return None
            numel = 0 if 0 in sizes else 1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True))
            live[m.group(1)] = numel * torch.empty((), dtype=dtype).element_size()
            total += live[m.group(1)]
            peak = max(peak, total)
            continue
        m = reuse.match(s)
        if m:
            live[m.group(1)] = live.pop(m.group(2), 0)
            continue
        m = fallback.match(s)
        if m:
            live[m.group(1)] = 0
            pending.add(m.group(1))
            returned.add(m.group(1))
            continue
        m = item.match(s)
        if m and m.group(2) in returned:
            live[m.group(1)] = 0
            pending.add(m.group(1))
            pending.discard(m.group(2))  # a tuple: its items carry the bytes
            continue
        m = checked.match(s)
        if m and m.group(1) in pending:
            pending.discard(m.group(1))
            sizes = [int(x) for x in m.group(2).replace(" ", "").split(",") if x]
            strides = [int(x) for x in m.group(3).replace(" ", "").split(",") if x]
            if len(sizes) == len(strides):
                numel = (
                    0 if 0 in sizes else 1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True))
                )
                live[m.group(1)] = numel * fallback_itemsize
                total += live[m.group(1)]
                peak = max(peak, total)
            continue
        if s.startswith("del "):
            for name in (n.strip() for n in s[4:].split("#")[0].split(",")):
                total -= live.pop(name, 0)
    return peak


def no_autograd_cache() -> Any:
    """A context that turns off AOTAutograd's compiled-graph cache (``torch._functorch.config.enable_autograd_cache``),
    whose hits skip the partitioner; a no-op context where this torch has no such option."""
    import contextlib

    from torch._functorch import config as functorch_config

    if not hasattr(functorch_config, "enable_autograd_cache"):
        return contextlib.nullcontext()
    return functorch_config.patch(enable_autograd_cache=False)


def eager_backward_compile() -> Any:
    """A context under which AOTAutograd compiles the backward graph together with the forward, not lazily at the
    first ``backward()``: ``torch._functorch.config.patch(force_non_lazy_backward_lowering=True)``. A no-op
    context where this torch has no such option."""
    import contextlib

    from torch._functorch import config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return functorch_config.patch(force_non_lazy_backward_lowering=True)


@dataclass(frozen=True)
class InlineRules:
    """What memfit's fusion model reads of inductor's store-or-inline rules (torch/_inductor/config.py, lowering.py,
    graph.py): which ops load their inputs inside their own fused loops, and how many buffers one fused expression
    may read before inductor stores it (``realize_acc_reads_threshold``, per device type: ``"cpu"`` or
    ``"other"``)."""

    acc_reads: dict[str, int]
    lowered: Any  # target -> bool: inductor fuses this op's inputs into its own loops (loads them inline)


@functools.cache
def inductor_inline_rules() -> InlineRules:
    """The rules of this torch's inductor, with torch 2.13's values where an attribute is missing. An op is lowered
    when ``lowering.lowerings`` has it and neither ``lowering.fallbacks`` nor ``lowering.needs_realized_inputs``
    does."""
    config: Any
    lowering: Any
    try:
        from torch._inductor import config, lowering
    except ImportError:  # pragma: no cover - inductor ships with torch
        config = lowering = None

    def cfg(name: str, default: int) -> int:
        value = getattr(config, name, None)
        return int(value) if isinstance(value, int) else default

    acc_all = cfg("realize_acc_reads_threshold", 0) or None
    lowerings: Any = getattr(lowering, "lowerings", {})
    realized: Any = getattr(lowering, "needs_realized_inputs", set())
    fallbacks: Any = getattr(lowering, "fallbacks", set())

    @functools.cache
    def lowered(target: Any) -> bool:
        packet = getattr(target, "overloadpacket", None)
        if target in realized or packet in realized or target in fallbacks:
            return False
        return target in lowerings or packet in lowerings

    return InlineRules(
        acc_reads={
            "cpu": acc_all or cfg("realize_cpu_acc_reads_threshold", 12),
            "other": acc_all or cfg("_realize_acc_reads_threshold_default", 8),
        },
        lowered=lowered,
    )


def functorch_config() -> Any:
    """``torch._functorch.config``: AOTAutograd's settings, among them ``activation_memory_budget`` (the fraction of
    saved activation bytes the default partitioner's knapsack keeps)."""
    from torch._functorch import config

    return config


def compiling_state() -> Any:
    """A context under which ``torch.compiler.is_compiling()`` and ``torch.compiler.is_exporting()`` are true, as
    during non-strict ``torch.export`` (``torch._export.utils._compiling_state_context``, which sets
    ``torch.compiler._is_compiling_flag`` and ``_is_exporting_flag``).

    Libraries take their trace-friendly branches under it: HF transformers' masking code skips the data-dependent
    ``padding_mask.all()`` shortcut, its MoE layers fall back from ``grouped_mm`` where its fake kernel demands bf16.
    Where this torch has no such context, the two flags are set directly (and restored).
    """
    import contextlib

    try:
        from torch._export.utils import _compiling_state_context

        return _compiling_state_context()
    except ImportError:
        pass

    @contextlib.contextmanager
    def flags() -> Any:
        compiler: Any = torch.compiler
        old = (compiler._is_compiling_flag, compiler._is_exporting_flag)
        try:
            compiler._is_compiling_flag = compiler._is_exporting_flag = True
            yield
        finally:
            compiler._is_compiling_flag, compiler._is_exporting_flag = old

    return flags()


def inductor_graph_runs() -> Any:
    """A context that yields a list, to which every run of an inductor-compiled graph inside it appends one entry;
    ``None`` where this torch cannot report such runs.

    ``torch._inductor.debug.RECORD_GRAPH_EXECUTION`` / ``GRAPH_EXECUTION_ORDER``: with the flag set and the list in
    place, ``CompiledFxGraph.__call__`` (torch/_inductor/output_code.py) appends ``{"compile_id": ...}`` per call.
    Both are restored on exit.
    """
    import contextlib

    @contextlib.contextmanager
    def runs() -> Any:
        try:
            from torch._inductor import debug
        except ImportError:
            yield None
            return
        if not hasattr(debug, "RECORD_GRAPH_EXECUTION") or not hasattr(debug, "GRAPH_EXECUTION_ORDER"):
            yield None
            return
        old = (debug.RECORD_GRAPH_EXECUTION, debug.GRAPH_EXECUTION_ORDER)
        log: list[Any] = []
        debug.RECORD_GRAPH_EXECUTION, debug.GRAPH_EXECUTION_ORDER = True, log
        try:
            yield log
        finally:
            debug.RECORD_GRAPH_EXECUTION, debug.GRAPH_EXECUTION_ORDER = old

    return runs()
