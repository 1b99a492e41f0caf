"""Capture a PyTorch training step (forward + backward) as a :class:`memfit.remat.Graph`.

The joint forward+backward graph is traced once per batch shape with AOTAutograd's export (``make_fx`` over
the functionalized module, with fake tensors, so capture allocates no real activation memory). Every value of
that graph becomes a node of a framework-free :class:`~memfit.remat.Graph`:

- placeholders (parameters, buffers, the flattened batch) are ``input`` nodes;
- the loss, the gradients and the new values of mutated buffers are ``output`` nodes;
- an op's output is a node whose ``bytes`` is its storage size, or 0 for a view (an output that aliases an
  argument), which instead keeps its *root base* alive: every user of a view also depends on the base, so a
  schedule can never free a base while one of its views is still needed;
- an op with several outputs (``native_layer_norm``, ``native_dropout``, ``convolution_backward``...) becomes one
  node per used output, each depending on the op's arguments; the lowering runs the op once for siblings that
  are computed together (see :mod:`memfit.remat.eager.lower`);
- random ops (``Tag.nondeterministic_seeded`` with a nonzero ``dropout_p`` where the op has one: dropout, not
  attention without dropout) draw from the global generator in capture order, as eager autograd's forward does:
  the generator's state before random op k is a small graph value (``rng_state`` for k = 0, else an extra output of
  random op k - 1), so a recomputation replays the same state and draws the same mask, and the first computes of
  random ops keep their order; ops with side effects are not recomputable.

Costs are seconds, estimated per node by :mod:`memfit.remat.eager.costs` (FLOPs and bytes moved at rates
calibrated once on the device, ``cost="flops"``), or measured by running the captured graph on real tensors
(``cost="profile"``).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memfit import _compat
from memfit.remat.core.graph import Graph
from memfit.remat.eager.costs import (
    Rates,
    _calibrate,
    _estimate_cost,
    _is_random,
    _tensor_args,
    calibrate,
    check_rates,
)

CostModel = Literal["flops", "profile"]

__all__ = ["CapturedStep", "Rates", "UnsupportedGraph", "calibrate", "capture"]


class UnsupportedGraph(Exception):
    """The training step cannot be captured or scheduled; ``op`` names the culprit, ``reason`` says why."""

    def __init__(self, *, op: str, reason: str) -> None:
        self.op = op
        self.reason = reason
        super().__init__(f"cannot capture the training step at {op}: {reason}")


@dataclass(frozen=True)
class ValueRef:
    """Where the value of one graph node comes from in the captured fx graph.

    Attributes:
        node: the fx node of the op (for a multi-output op, the op itself, not its ``getitem``).
        index: which output of a multi-output op, else ``None``.
        view_of: graph id of the root base when this value is a view of another value, else ``None``.
        random: the op draws random numbers (its position among random ops, in capture order), else ``None``.
        rng: this value is not an output of the op but the generator's state after it (random ops only).
    """

    node: fx.Node
    index: int | None
    view_of: int | None
    random: int | None
    rng: bool = False


@dataclass
class CapturedStep:
    """A captured training step: the joint fx graph, its :class:`Graph`, and how the two map onto each other.

    Attributes:
        gm: the functionalized joint forward+backward graph (aten ops), inputs ``params, buffers, *batch``.
        graph: the framework-free graph the solvers schedule.
        refs: for each graph node id, where its value comes from (``None`` for inputs).
        placeholder_ids: graph node id of each fx placeholder, in call order.
        param_names: names of the parameters, in call order (the first ``len(param_names)`` placeholders).
        buffer_names: names of the buffers, in call order (after the parameters).
        output_ids: graph node id of each fx output, in the fx output tuple's order.
        loss_index: which fx output is the loss.
        grad_outputs: parameter name -> index in the fx outputs of its gradient.
        buffer_outputs: buffer name -> index in the fx outputs of its new value.
        batch_spec: the pytree spec of the batch (the lowered step checks a new batch against it).
        batch_meta: (shape, dtype, device) of each flattened batch tensor.
        n_random: number of random ops.
        rng_device: the device whose default generator the random ops draw from (``None`` without random ops).
        rng_input_id: graph node id of the generator state at the start of the step (an input), else ``None``.
        rng_output_id: graph node id of the generator state after the last random op (an output), else ``None``.
        capture_seconds: wall time of the trace and graph construction.
        id_of: fx node (or (fx node, output index)) -> graph node id.
    """

    gm: fx.GraphModule
    graph: Graph
    refs: list[ValueRef | None]
    placeholder_ids: list[int]
    param_names: list[str]
    buffer_names: list[str]
    output_ids: list[int]
    loss_index: int
    grad_outputs: dict[str, int]
    buffer_outputs: dict[str, int]
    batch_spec: pytree.TreeSpec
    batch_meta: list[tuple[torch.Size, torch.dtype, torch.device]]
    n_random: int
    capture_seconds: float
    id_of: dict[Any, int] = field(default_factory=dict)
    rng_device: torch.device | None = None
    rng_input_id: int | None = None
    rng_output_id: int | None = None

    @property
    def input_bytes(self) -> int:
        """Bytes of the inputs (parameters, buffers, batch): resident for the whole step."""
        return sum(self.graph.nbytes(v) for v in self.placeholder_ids)


class _Inner(torch.nn.Module):
    """``forward(batch) = loss_fn(model, batch)``; ``torch.func.functional_call`` swaps the model's tensors in it."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


class _LossModule(torch.nn.Module):
    """``forward(*flat_batch) -> (loss,)``: the shape AOTAutograd's joint export expects, with **one input per
    tensor**.

    AOTAutograd lifts ``named_parameters(remove_duplicate=False)``: a parameter registered under two names (a tied
    embedding and LM head, BERT's ``cls.predictions.bias`` and ``decoder.bias``, T5's ``shared`` embedding) would
    become two inputs, one of which receives no gradient (its export then fails). This module registers each
    distinct parameter and buffer once, as ``p0, p1, ...`` / ``b0, b1, ...``, and calls ``loss_fn(model, batch)``
    with every name of a tensor bound to that one input (``torch.func.functional_call``), so the gradient of a tied
    tensor is the sum over all its uses, as in eager autograd. ``names[attr]`` lists the model's names of the
    tensor registered as ``attr``, first the one ``named_parameters()`` reports.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]):
        super().__init__()
        self._inner: _Inner
        object.__setattr__(self, "_inner", _Inner(model, loss_fn))  # not a submodule: its tensors are ours
        self.batch_spec: pytree.TreeSpec | None = None
        self.names: dict[str, list[str]] = {}
        for prefix, named in (
            ("p", model.named_parameters(remove_duplicate=False)),
            ("b", model.named_buffers(remove_duplicate=False)),
        ):
            seen: dict[int, str] = {}
            for name, t in named:
                if id(t) not in seen:
                    seen[id(t)] = f"{prefix}{len(seen)}"
                    if prefix == "p":
                        self.register_parameter(seen[id(t)], t)  # type: ignore[arg-type]
                    else:
                        self.register_buffer(seen[id(t)], t)
                self.names.setdefault(seen[id(t)], []).append(name)

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor]:
        assert self.batch_spec is not None
        batch = pytree.tree_unflatten(list(flat), self.batch_spec)
        tensors = {f"model.{n}": getattr(self, attr) for attr, names in self.names.items() for n in names}
        loss = torch.func.functional_call(self._inner, tensors, (batch,), tie_weights=False, strict=False)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
        return (loss.reshape(()),)

    def model_name(self, attr: str) -> str:
        """The graph's name of the tensor registered as ``attr``: ``"model."`` + its first name in the model."""
        return f"model.{self.names[attr][0]}"


def flatten_batch(batch: Any) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """Flatten a tensor, or a tuple/list/dict of tensors, into a list of tensors and its spec."""
    leaves, spec = pytree.tree_flatten(batch)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"the batch must be a tensor or a (nested) tuple/list/dict of tensors; found a {type(leaf).__name__}"
            )
    if not leaves:
        raise ValueError("the batch holds no tensor")
    return leaves, spec


def _storage_bytes(val: torch.Tensor) -> int:
    try:
        return int(val.untyped_storage().nbytes())
    except (NotImplementedError, RuntimeError):
        return val.numel() * val.element_size()


def _alias_arg(node: fx.Node, out_index: int) -> fx.Node | None:
    """The argument that output ``out_index`` of ``node`` aliases (a view), or ``None``."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    returns = schema.returns
    ret = returns[min(out_index, len(returns) - 1)]
    alias = ret.alias_info
    if alias is None:
        return None
    if alias.is_write:
        raise UnsupportedGraph(op=str(node.target), reason="it writes into an argument (an in-place op)")
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.before_set & alias.before_set:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node):
                return value
    first = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return first


def _written(record: _Record) -> int:
    """Bytes one call of the record's op writes: all its outputs for a multi-output (or random) op."""
    ref = record.ref
    if ref is None or (ref.index is None and ref.random is None):
        return record.nbytes
    leaves = pytree.tree_leaves(ref.node.meta.get("val"))
    return sum(_storage_bytes(t) for t in leaves if isinstance(t, torch.Tensor))


def capture(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    example_batch: Any,
    *,
    cost: CostModel = "flops",
    rates: Rates | None = None,
) -> CapturedStep:
    """Trace one training step of ``model`` into a schedulable graph. Allocates no activation memory.

    Args:
        model: the module to train; its parameters with ``requires_grad`` get gradients.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        example_batch: a tensor or a (nested) tuple/list/dict of tensors; fixes shapes and dtypes.
        cost: ``"flops"`` (FLOPs + bytes moved at calibrated rates) or ``"profile"`` (time each op on real
            tensors: a real step's memory is allocated once).
        rates: the device speeds ``"flops"`` prices ops at (default: :func:`calibrate`'s, measured once per
            process); one ``Rates`` given to every process gives the same costs, and so the same plans, in each.

    Returns:
        The :class:`CapturedStep`.

    Raises:
        UnsupportedGraph: the model cannot be traced, mutates its batch in place, or uses an op memfit cannot
            schedule. The message names the cause.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if cost not in ("flops", "profile"):
        raise ValueError(f"cost must be 'flops' or 'profile', got {cost!r}")
    check_rates(rates)
    t0 = time.perf_counter()
    flat, spec = flatten_batch(example_batch)
    # tracing and calibration draw random numbers: fork the RNG so that capturing (e.g. by memfit.remat.compile
    # right after a resumed run restored its RNG state) does not shift the user's random stream
    cuda = sorted({t.device.index or 0 for t in flat if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        return _capture(model, loss_fn, flat, spec, cost, t0, rates)


def _capture(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    flat: list[torch.Tensor],
    spec: Any,
    cost: CostModel,
    t0: float,
    rates: Rates | None = None,
) -> CapturedStep:
    wrapper = _LossModule(model, loss_fn)
    wrapper.batch_spec = spec
    try:
        # fake inputs: the trace then runs on fake tensors throughout (with real ones it allocates real activations)
        fake_mode = _compat.fake_tensor_mode()
        # as torch.compile/export do: libraries then take their trace-friendly branches (HF's masks, MoE experts)
        with _compat.compiling_state():
            gm, sig = _compat.aot_export_joint(wrapper, tuple(fake_mode.from_tensor(t) for t in flat))
    except (UnsupportedGraph, ValueError, TypeError):
        raise
    except Exception as exc:  # the tracer's own errors are many and private: name the cause, keep the chain
        raise UnsupportedGraph(
            op="<trace>", reason=f"{type(exc).__name__}: {exc}".split("\n")[0][:500]
        ) from exc

    if sig.user_inputs_to_mutate:
        raise UnsupportedGraph(op="<batch>", reason="loss_fn mutates its batch in place; pass a copy instead")
    if getattr(sig, "parameters_to_mutate", None):
        raise UnsupportedGraph(op="<parameters>", reason="the forward mutates parameters in place")

    device = flat[0].device
    _drop_identity_dropouts(gm)
    _drop_redundant_clones(gm)
    records, id_of, n_random, rng_device = _analyze(gm)
    rng_ids = [gid for gid, r in enumerate(records) if r.ref is not None and r.ref.rng]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_args = list(out_node.args[0])
    output_ids = [id_of[_key(a)] for a in out_args]
    outputs = set(output_ids)
    for gid in output_ids:  # an output that is a view keeps its base resident to the end
        ref = records[gid].ref
        if ref is not None and ref.view_of is not None:
            outputs.add(ref.view_of)
    if rng_ids:  # the generator is left where eager autograd's forward leaves it
        outputs.add(rng_ids[-1])
    if cost == "profile":
        costs = _profile_costs(gm, records, wrapper, flat)
    else:
        rates = rates if rates is not None else _calibrate(device)
        costs = [
            0.0
            if r.ref is None
            else _estimate_cost(r.ref.node, _written(r), r.ref.view_of is not None, rates)
            for r in records
        ]
    _share_sibling_costs(records, costs)
    graph = _make_graph(records, costs, outputs)

    out_names = [a.name for a in out_args]
    name = wrapper.model_name
    return CapturedStep(
        gm=gm,
        graph=graph,
        refs=[r.ref for r in records],
        placeholder_ids=[gid for gid, r in enumerate(records) if r.placeholder],
        param_names=[name(p) for p in sig.parameters],
        buffer_names=[name(b) for b in sig.buffers],
        output_ids=output_ids,
        loss_index=out_names.index(sig.user_outputs[0]),
        grad_outputs={
            name(p): out_names.index(n) for n, p in sig.backward_signature.gradients_to_parameters.items()
        },
        buffer_outputs={name(b): out_names.index(n) for n, b in sig.buffers_to_mutate.items()},
        batch_spec=spec,
        batch_meta=[(t.shape, t.dtype, t.device) for t in flat],
        n_random=n_random,
        capture_seconds=time.perf_counter() - t0,
        id_of=id_of,
        rng_device=rng_device,
        rng_input_id=id_of.get(_RNG_INPUT),
        rng_output_id=rng_ids[-1] if rng_ids else None,
    )


def _drop_identity_dropouts(gm: fx.GraphModule) -> None:
    """Remove ``native_dropout(x, p=0)``: the trace keeps a copy of x and a mask that eager autograd never makes.

    Models built with dropout 0 (HF configs, most LLMs) still call their dropout modules; eager PyTorch returns the
    input for p = 0, while the traced op allocates an output and a boolean mask that backward keeps alive.
    """
    aten = torch.ops.aten
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not aten.native_dropout.default or float(node.args[1]) != 0.0:
            continue
        for user in list(node.users):
            if user.target is not operator.getitem:
                break
            if user.args[1] == 0:  # the output is the input
                user.replace_all_uses_with(node.args[0])
            else:  # the mask only feeds native_dropout_backward(grad, mask, scale) = grad * mask * scale = grad
                for back in list(user.users):
                    if back.target is aten.native_dropout_backward.default and float(back.args[2]) == 1.0:
                        back.replace_all_uses_with(back.args[0])
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _drop_redundant_clones(gm: fx.GraphModule) -> None:
    """Replace ``clone(x)`` by ``x`` where the copy changes nothing: same strides, and nothing is ever mutated.

    The trace turns ops that return their input unchanged in eager mode (``dropout(p=0)``, ``.to()`` of the same
    dtype, ``contiguous()`` of a contiguous tensor) into clones; eager autograd then saves one tensor where the
    traced graph would save two. The joint graph is functional, so sharing the storage is safe; clones that
    are graph outputs or copy an input are kept (outputs must not alias each other or the parameters).
    """
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {a for a in pytree.tree_leaves(out_node.args) if isinstance(a, fx.Node)}
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.aten.clone.default or node in outputs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op == "placeholder":
            continue
        a, b = src.meta.get("val"), node.meta.get("val")
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            continue
        same_layout = a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        # a clone of a slice frees the rest of its base: keep it
        if same_layout and a.storage_offset() == 0 and _storage_bytes(a) == _storage_bytes(b):
            node.replace_all_uses_with(src)
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _key(node: fx.Node) -> Any:
    """Graph-id key of an fx value: a getitem of a multi-output op is keyed by (op node, index)."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return (node.args[0], node.args[1])
    return node


@dataclass
class _Record:
    key: Any
    name: str
    nbytes: int
    deps: list[int]
    ref: ValueRef | None
    recomputable: bool
    placeholder: bool


_RNG_INPUT = "rng_state"


def generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device`` (what dropout draws from there)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or torch.cuda.current_device()]
    if device.type == "cpu":
        return torch.default_generator
    raise UnsupportedGraph(
        op="<random>", reason=f"random ops on {device.type} (only CPU and CUDA are supported)"
    )


def _device_of(val: Any) -> torch.device:
    return next(t.device for t in pytree.tree_leaves(val) if isinstance(t, torch.Tensor))


def _analyze(gm: fx.GraphModule) -> tuple[list[_Record], dict[Any, int], int, torch.device | None]:
    """One record per schedulable value of ``gm``, in topological order (record index = graph node id)."""
    records: list[_Record] = []
    id_of: dict[Any, int] = {}
    n_random = 0
    rng_device: torch.device | None = None
    rng_state: int | None = None  # graph id of the generator state before the next random op

    def root(gid: int) -> int:
        ref = records[gid].ref
        return ref.view_of if ref is not None and ref.view_of is not None else gid

    def deps_of(node: fx.Node) -> list[int]:
        deps: list[int] = []
        for a in _tensor_args(node):
            k = _key(a)
            if k not in id_of:
                raise UnsupportedGraph(
                    op=str(node.target), reason=f"its argument {a.name} is not a tensor value"
                )
            gid = id_of[k]
            for d in (gid, root(gid)):  # a view's users also need its base resident
                if d not in deps:
                    deps.append(d)
        return deps

    def add(
        key: Any,
        name: str,
        val: torch.Tensor,
        node: fx.Node,
        index: int | None,
        deps: list[int],
        random: int | None,
    ) -> int:
        alias = _alias_arg(node, index or 0)
        view_of = root(id_of[_key(alias)]) if alias is not None else None
        nbytes = 0 if view_of is not None else _storage_bytes(val)
        ref = ValueRef(node=node, index=index, view_of=view_of, random=random)
        id_of[key] = len(records)
        records.append(_Record(key, name, nbytes, deps, ref, not _is_impure(node), False))
        return id_of[key]

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            val = getattr(gm, str(node.target)) if node.op == "get_attr" else node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise UnsupportedGraph(op=node.name, reason="a graph input that is not a tensor")
            id_of[node] = len(records)
            records.append(
                _Record(node, node.name, _storage_bytes(val), [], None, False, node.op == "placeholder")
            )
            continue
        if node.op == "output" or (node.op == "call_function" and node.target is operator.getitem):
            continue  # a getitem is handled with its multi-output op
        if node.op != "call_function":
            raise UnsupportedGraph(op=str(node.target), reason=f"unexpected fx node kind {node.op!r}")
        val = node.meta.get("val")
        random = None
        deps = deps_of(node) if isinstance(val, (torch.Tensor, tuple, list)) else []
        if _is_random(node):
            device = _device_of(val)
            if rng_device is None:
                rng_device = device
                rng_state = id_of[_RNG_INPUT] = len(records)
                # generator states are host-side snapshots (5 KiB on CPU, 16 bytes for CUDA), not the device memory
                # a budget is about: 0 bytes
                records.append(_Record(_RNG_INPUT, _RNG_INPUT, 0, [], None, False, False))
            elif device != rng_device:
                raise UnsupportedGraph(
                    op=str(node.target), reason=f"random ops on two devices ({rng_device} and {device})"
                )
            random = n_random
            n_random += 1
            assert rng_state is not None
            deps = [*deps, rng_state]
        if isinstance(val, torch.Tensor):
            add(node, node.name, val, node, None, deps, random)
        elif isinstance(val, (tuple, list)):
            users = sorted(
                (u for u in node.users if u.target is operator.getitem), key=lambda u: int(u.args[1])
            )
            for u in users:
                i = int(u.args[1])
                if (node, i) in id_of or not isinstance(val[i], torch.Tensor):
                    continue
                add((node, i), u.name, val[i], node, i, deps, random)
        elif val is None and not node.users:
            continue  # an assertion-like op with no result: nothing to schedule
        else:
            raise UnsupportedGraph(op=str(node.target), reason=f"an output of type {type(val).__name__}")
        if random is not None:  # the generator's state after this op: what the next random op starts from
            assert rng_state is not None and rng_device is not None
            key = (node, "rng")
            id_of[key] = len(records)
            ref = ValueRef(node=node, index=None, view_of=None, random=random, rng=True)
            records.append(_Record(key, f"{node.name}_rng", 0, deps, ref, True, False))
            rng_state = id_of[key]
    return records, id_of, n_random, rng_device


def _share_sibling_costs(records: list[_Record], costs: list[float]) -> None:
    """Every output of a multi-output op (and a random op's generator state) costs the whole op call: computed on
    its own it takes one call, as the lowering runs it. Outputs computed back to back share one call; the
    schedule's cost as run is :func:`memfit.remat.eager.lower.call_cost`, which counts calls, not values."""
    groups: dict[fx.Node, list[int]] = {}
    for gid, r in enumerate(records):
        if r.ref is not None and (r.ref.index is not None or r.ref.random is not None):
            groups.setdefault(r.ref.node, []).append(gid)
    for members in groups.values():
        op = max(costs[g] for g in members)
        for g in members:
            costs[g] = op


def _make_graph(records: list[_Record], costs: list[float], outputs: set[int]) -> Graph:
    graph = Graph()
    for gid, r in enumerate(records):
        is_input = r.ref is None
        got = graph.add(
            r.name,
            r.nbytes,
            cost=0.0 if is_input else costs[gid],
            deps=() if is_input else r.deps,
            input=is_input,
            output=gid in outputs and not is_input,
            recomputable=r.recomputable if not is_input else True,
        )
        assert got == gid
    return graph


def _is_impure(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        return bool(schema.is_mutable) or any(
            a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
        )
    return False


def module_tensors(model: torch.nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    """The parameters and buffers of ``model`` named ``names`` (as the captured graph names them), in order."""
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    # the graph names them as attributes of _LossModule, i.e. with a "model." prefix
    return [named[n.removeprefix("model.")] for n in names]


def _profile_costs(
    gm: fx.GraphModule, records: list[_Record], wrapper: _LossModule, flat: Sequence[torch.Tensor]
) -> list[float]:
    """Measured seconds per record: run the captured graph once on real tensors, timing each op."""
    device = flat[0].device
    per_node: dict[fx.Node, float] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class _Timer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.op != "call_function" or n.target is operator.getitem:
                return super().run_node(n)
            sync()
            t0 = time.perf_counter()
            out = super().run_node(n)
            sync()
            per_node[n] = time.perf_counter() - t0
            return out

    # buffers are inputs of the functional graph (their new values are outputs), so nothing is mutated;
    # fork the RNG so that profiling does not shift the user's random stream
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _Timer(gm).run(*wrapper.parameters(), *wrapper.buffers(), *flat)
    return [0.0 if r.ref is None else per_node.get(r.ref.node, 0.0) for r in records]
