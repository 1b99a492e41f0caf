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
    "inductor_layout_optimization",
    "inductor_partitioning",
    "inductor_wrapper_peak",
    "inductor_wrapper_plan",
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


@dataclass(frozen=True)
class WrapperPlan:
    """Inductor's buffer plan of one compiled graph, replayed from its generated wrapper (:func:`inductor_wrapper_plan`).

    Attributes:
        peak: the peak bytes of one call: inputs still alive plus the buffers the wrapper holds (and, with
            ``onednn_scratch``, what a oneDNN convolution holds inside its call).
        returned: per returned value, the bytes of the buffer it is when the wrapper allocated that buffer itself
            (a layout copy of an input included), 0 for an input, a view of an input or ``None``.
    """

    peak: int
    returned: tuple[int, ...]


def inductor_wrapper_peak(
    source_code: str, arg_bytes: dict[str, int], fallback_itemsize: int = 4
) -> int | None:
    """The peak bytes of one call of an inductor-compiled graph, read from its generated Python wrapper.

    :func:`inductor_wrapper_plan`'s ``peak`` without the oneDNN scratch rule; ``None`` where the source is not
    of the expected form.
    """
    plan = inductor_wrapper_plan(source_code, arg_bytes, fallback_itemsize)
    return None if plan is None else plan.peak


_SHAPE = r"\(([^)]*)\), \(([^)]*)\)"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _extent(sizes: list[int], strides: list[int]) -> int:
    """Elements a strided tensor spans (0 when a size is 0)."""
    return 0 if 0 in sizes else 1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True))


def _call_args(text: str) -> list[str]:
    """The top-level comma-separated arguments of the call that opens at the first ``(`` of ``text``."""
    depth, out, cur = 0, [], ""
    for ch in text[text.index("(") :]:
        if ch in "([":
            depth += 1
            if depth == 1:
                continue
        elif ch in ")]":
            depth -= 1
            if depth == 0:
                out.append(cur.strip())
                break
        if ch == "," and depth == 1:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [a for a in out if a]


def inductor_wrapper_plan(
    source_code: str,
    arg_bytes: dict[str, int],
    fallback_itemsize: int = 4,
    *,
    onednn_scratch: bool = False,
) -> WrapperPlan | None:
    """Inductor's buffer plan of one call of a compiled graph, read from its generated Python wrapper.

    Inductor's wrapper (``CompiledFxGraph.source_code``, torch/_inductor/codegen/wrapper.py) allocates every buffer
    with ``bufN = empty_strided_<device>((sizes), (strides), dtype)``, hands one to another with
    ``bufM = reinterpret_tensor(bufN, ...); del bufN  # reuse``, and frees with ``del a, b``; the graph's inputs
    (``a, b = args``, then ``args.clear()``) are freed by ``del`` after their last use as well. Replaying those
    statements gives the buffer plan's peak: inputs still alive plus allocated buffers. Layout copies (a
    channels-last copy of a convolution's input or weight) are ``empty_strided`` buffers like any other. Tensors a
    fallback kernel returns (``bufN = extern_kernels.convolution(...)``, ``bufN = torch.ops.aten.X.default(...)``,
    and the items ``bufM = bufN[i]`` of a kernel that returns several, as ``convolution_backward`` does) are
    allocated by the kernel: the wrapper checks each with ``assert_size_stride(bufN, sizes, strides, ...)``, which
    gives its extent; the dtype is not written there, so they count ``fallback_itemsize`` bytes an element. A kernel
    that returns several tensors allocates them all in its call, and its result tuple holds each until both the
    tuple and the item's own name are deleted (``del bufM`` after ``bufM = bufN[i]`` frees nothing while ``bufN``
    lives): measured on GPT-NeoX's backward, where ``_scaled_dot_product_flash_attention_for_cpu_backward``'s three
    gradients stay resident from its call to ``del bufN``, RSS 0.8 MB above a replay that counted each item from
    its ``assert_size_stride`` to its own ``del``. A name bound to another buffer (``bufM = bufN``, as the wrapper
    writes for a custom op's output, e.g. transformers' ``grouped_mm_fallback``; or
    ``bufM = reinterpret_tensor(bufN, ...)  # alias``) shares its memory, freed when every name of it is deleted.

    With ``onednn_scratch`` (a CPU graph, oneDNN convolutions), a convolution's call also holds its outputs and
    oneDNN's own buffers at once, before the wrapper frees its inputs. Measured on torch 2.13's CPU build (fp32,
    one thread, RSS with glibc's mmap threshold at 64 KiB; ``docs/remat_compiled.md``, "Convnets on CPU
    inductor"): a forward convolution holds a copy of its weight in oneDNN's blocked format (0.95-1.04x the
    weight's bytes), plus its output in that format when the input is not channels-last; ``convolution_backward``
    holds twice the weight's bytes with channels-last inputs (the weight and its gradient in the blocked format:
    1.96-1.99x measured on the 3x3 convolutions of 256 and 512 channels), and the weight's plus the output
    gradient's otherwise.

    Args:
        source_code: the wrapper module's source.
        arg_bytes: bytes of each input by name that occupies memory of its own (others count 0).
        fallback_itemsize: bytes per element of a fallback kernel's outputs (the graph's float dtype).
        onednn_scratch: count oneDNN's buffers inside convolution calls (CPU graphs).

    Returns:
        The plan, or ``None`` when the source has no ``call`` function of the expected form (another torch
        version's codegen): callers then keep their own estimate.
    """
    import re

    lines = source_code.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if re.match(r"\s*def call\((self, )?args\):", line)), None
    )
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip()) + 4
    body: list[str] = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        if line.strip() and not line.strip().startswith("#"):
            body.append(line.strip())
    alloc = re.compile(rf"(\w+) = empty_strided(?:_\w+)?\({_SHAPE}, torch\.(\w+)\)")
    reuse = re.compile(r"(\w+) = (?:reinterpret_tensor\()?(\w+)\b.*; del \2\s+# reuse")
    fallback = re.compile(r"(\w+) = (?:extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(")
    item = re.compile(r"(\w+) = (\w+)\[\d+\]$")
    checked = re.compile(rf"assert_size_stride\((\w+), {_SHAPE}")
    view = re.compile(rf"reinterpret_tensor\((\w+), {_SHAPE}")
    alias = re.compile(r"(\w+) = (?:reinterpret_tensor\((\w+), .*\)\s+# alias|(\w+))$")
    shapes: dict[str, tuple[list[int], list[int]]] = {}  # name -> (sizes, strides), where the wrapper says
    pending: set[str] = set()  # fallback outputs whose extent the next assert_size_stride gives
    returned: set[str] = set()  # the (tuple) results of fallback kernels
    held: dict[str, dict[str, int]] = {}  # a live tuple result -> its items still named, with their bytes
    holder: dict[str, str] = {}  # a named item (or what reuses its buffer) -> the live tuple that holds it
    root: dict[str, str] = {}  # a second name of a buffer -> the name that carries its bytes
    sharers: dict[str, set[str]] = {}  # a name that carries bytes -> the second names still alive
    dead: dict[str, int] = {}  # a deleted name whose bytes its second names keep
    live: dict[str, int] = {}
    peak = 0
    total = 0

    def shape_of(arg: str) -> tuple[list[int], list[int]] | None:
        m = view.match(arg)
        return (_ints(m.group(2)), _ints(m.group(3))) if m else shapes.get(arg)

    def nbytes(arg: str) -> int:
        shape = shape_of(arg)
        if shape is None or len(shape[0]) != len(shape[1]):
            return 0
        return _extent(*shape) * fallback_itemsize

    def channels_last(arg: str) -> bool:
        shape = shape_of(arg)
        return shape is not None and len(shape[1]) == 4 and shape[0][1] > 1 and shape[1][1] == 1

    def outputs_of(i: int, name: str) -> int:
        """Bytes of what the fallback call at ``body[i]`` returns, from the assert_size_stride lines after it."""
        items, out = {name}, 0
        for s in body[i + 1 :]:
            m = item.match(s)
            if m and m.group(2) in items:
                items.add(m.group(1))
                continue
            m = checked.match(s)
            if m and m.group(1) in items:
                sizes, strides = _ints(m.group(2)), _ints(m.group(3))
                if len(sizes) == len(strides):
                    out += _extent(sizes, strides) * fallback_itemsize
                continue
            if not s.startswith("del "):
                break
        return out

    def items_of(i: int, name: str) -> dict[str, int]:
        """The named items ``bufM = name[j]`` of the tuple the call at ``body[i]`` returns, with their bytes (from
        their ``assert_size_stride`` lines, wherever those stand in the rest of the body)."""
        found: dict[str, int] = {}
        for s in body[i + 1 :]:
            m = item.match(s)
            if m and m.group(2) == name:
                found[m.group(1)] = 0
                continue
            m = checked.match(s)
            if m and m.group(1) in found:
                sizes, strides = _ints(m.group(2)), _ints(m.group(3))
                if len(sizes) == len(strides):
                    found[m.group(1)] = _extent(sizes, strides) * fallback_itemsize
        return found

    def scratch(s: str, out: int) -> int:
        if ".convolution(" in s and s.split("=", 1)[1].strip().startswith("extern_kernels.convolution("):
            args = _call_args(s.split("=", 1)[1])
            if len(args) < 2:
                return 0
            return nbytes(args[1]) + (0 if channels_last(args[0]) else out)
        if "aten.convolution_backward." in s:
            args = _call_args(s.split("=", 1)[1])
            if len(args) < 3:
                return 0
            weight = nbytes(args[2])
            return 2 * weight if channels_last(args[1]) else weight + nbytes(args[0])
        return 0

    for i, s in enumerate(body):
        if s.endswith("= args") and "," in s:
            for name in (n.strip() for n in s[: -len("= args")].split(",")):
                if name:
                    live[name] = arg_bytes.get(name, 0)
            total = sum(live.values())
            peak = max(peak, total)
            continue
        m = alloc.match(s)
        if m:
            sizes, strides = _ints(m.group(2)), _ints(m.group(3))
            dtype = getattr(torch, m.group(4), None)
            if dtype is None or len(sizes) != len(strides):
                return None
            shapes[m.group(1)] = (sizes, strides)
            live[m.group(1)] = _extent(sizes, strides) * torch.empty((), dtype=dtype).element_size()
            total += live[m.group(1)]
            peak = max(peak, total)
            continue
        m = reuse.match(s)
        if m:
            live[m.group(1)] = live.pop(m.group(2), 0)
            if m.group(2) in sharers:  # the new name carries the bytes its second names share
                sharers[m.group(1)] = sharers.pop(m.group(2))
                root.update(dict.fromkeys(sharers[m.group(1)], m.group(1)))
            if m.group(2) in root:
                owner = root.pop(m.group(2))
                root[m.group(1)] = owner
                sharers[owner] = (sharers[owner] - {m.group(2)}) | {m.group(1)}
            if m.group(2) in holder:  # an item of a live tuple: its new name references the tuple's item
                owner = holder.pop(m.group(2))
                holder[m.group(1)] = owner
                held[owner][m.group(1)] = held[owner].pop(m.group(2))
            vm = view.search(s)
            if vm:
                shapes[m.group(1)] = (_ints(vm.group(2)), _ints(vm.group(3)))
            continue
        m = fallback.match(s)
        if m:
            items = items_of(i, m.group(1))
            if items:  # a tuple, which holds every item from the call on
                held[m.group(1)] = items
                holder.update(dict.fromkeys(items, m.group(1)))
                live[m.group(1)] = sum(items.values())
                total += live[m.group(1)]
                peak = max(peak, total)
                if onednn_scratch:
                    peak = max(peak, total + scratch(s, live[m.group(1)]))
                continue
            live[m.group(1)] = 0
            pending.add(m.group(1))
            returned.add(m.group(1))
            if onednn_scratch:
                out = outputs_of(i, m.group(1))
                peak = max(peak, total + out + scratch(s, out))
            continue
        m = item.match(s)
        if m and m.group(2) in held:
            live[m.group(1)] = 0  # the tuple holds its bytes
            continue
        m = alias.match(s)
        if m and (m.group(2) or m.group(3)) in live:
            base = m.group(2) or m.group(3)
            owner = root.get(base, base)
            root[m.group(1)] = owner
            sharers.setdefault(owner, set()).add(m.group(1))
            live[m.group(1)] = 0
            if base in pending:  # a fallback's output: the assert on either name gives its extent
                pending.add(m.group(1))
            vm = view.search(s)
            if vm:
                shapes[m.group(1)] = (_ints(vm.group(2)), _ints(vm.group(3)))
            elif base in shapes:
                shapes[m.group(1)] = shapes[base]
            continue
        m = checked.match(s)
        if m:
            sizes, strides = _ints(m.group(2)), _ints(m.group(3))
            shapes.setdefault(m.group(1), (sizes, strides))
            if m.group(1) in pending:
                owner = root.get(m.group(1), m.group(1))
                pending.difference_update({owner, *sharers.get(owner, ())})
                if len(sizes) == len(strides):
                    size = _extent(sizes, strides) * fallback_itemsize
                    if owner in live:
                        live[owner] += size
                    else:
                        dead[owner] = dead.get(owner, 0) + size
                    total += size
                    peak = max(peak, total)
            continue
        if s.startswith("del "):
            for name in (n.strip() for n in s[4:].split("#")[0].split(",")):
                if name in holder:  # an item: the live tuple still holds it
                    held[holder.pop(name)].pop(name, None)
                    live.pop(name, None)
                    continue
                if name in root:  # a second name: the bytes go when the last name of them does
                    owner = root.pop(name)
                    sharers[owner].discard(name)
                    live.pop(name, None)
                    if not sharers[owner]:
                        del sharers[owner]
                        total -= dead.pop(owner, 0)
                    continue
                if sharers.get(name):  # second names still alive keep the bytes
                    dead[name] = live.pop(name, 0)
                    continue
                sharers.pop(name, None)
                total -= live.pop(name, 0)
                for kept, size in held.pop(name, {}).items():  # a tuple: items still named keep their bytes
                    holder.pop(kept, None)
                    live[kept] = size
                    total += size
            continue
        if s.startswith("return "):
            rest = s[len("return ") :].strip()
            values = _call_args(rest) if rest.startswith("(") else [rest]
            out_bytes = []
            for value in values:
                vm = view.match(value)
                name = vm.group(1) if vm else value
                size = held[holder[name]][name] if name in holder else live.get(name, 0)
                out_bytes.append(size if name not in arg_bytes else 0)
            return WrapperPlan(peak, tuple(out_bytes))
    return WrapperPlan(peak, ())


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


def inductor_layout_optimization() -> tuple[bool, bool]:
    """``(layout_optimization, force_layout_optimization)`` of inductor's config as it is now (a ``config.patch``
    in force included; torch 2.13's defaults, ``(True, False)``, where an attribute is missing)."""
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - inductor ships with torch
        return True, False
    return bool(getattr(config, "layout_optimization", True)), bool(
        getattr(config, "force_layout_optimization", False)
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
