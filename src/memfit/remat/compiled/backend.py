"""memfit's budget solver on the compiled path: ``torch.compile(..., backend=memfit.remat.backend(budget=...))``.

``torch.compile`` traces the forward and backward into one joint graph (AOTAutograd), and a *partitioner* splits it
into a forward graph, which saves some values, and a backward graph, which recomputes the others from them; inductor
then fuses each graph into kernels. The stock partitioner (a min-cut over the joint graph) tunes for speed, and its
memory knob ``activation_memory_budget`` is a fraction of the saved activations' bytes that is not monotone in the
step's peak (recomputation temporaries land in the backward, pytorch/pytorch#197838).

memfit's partitioner decides instead, against a byte budget on the peak of the *whole* step:

1. It models the step as inductor will run it: the forward in order, then the backward in the order AOTAutograd
   gives it (each recomputed value inserted just before its first use, as ``reordering_to_mimic_autograd_engine``
   does), with the memory of every *materialized* value: the output of a matmul, convolution or attention kernel, of
   a reduction, anything an extern kernel or a fallback reads, anything a graph returns or saves, and a pointwise
   value read by several ops when inductor would store it (:class:`_Fusion`). A pointwise value read by a fused op
   (pointwise or reduction) lives inside the fused kernel and takes no memory. A backward matmul whose only reader
   is an add runs at that add, as the ``addmm`` inductor's post-grad pass makes of the two (:func:`_addmm_fusions`):
   with an LM head tied to the embedding, that holds the logits' gradient to the end of the backward.
2. Costs reflect fusion: recomputing a matmul costs its FLOPs at this device's measured rate; recomputing a
   pointwise op or a view fused into its consumer costs about the bytes it writes.
3. Greedy passes (the "bytes freed per second recomputed" ratio of the knapsack formulations, e.g. Checkmate,
   Jain et al. MLSys 2020, and the memory-budget partitioner of torch.compile) move forward values from *saved* to
   *recomputed* one at a time, always taking the value that frees the most predicted saved bytes per second of
   added recomputation; three passes, under three ratios of matmul to memory cost. Their prefixes, and torch's own
   choices (its default partition and its knapsack at three ``activation_memory_budget`` levels), priced and
   simulated, give a Pareto frontier of (peak, recompute cost); a budget takes the cheapest frontier point whose
   predicted peak fits, which makes the predicted peak monotone in the budget, and never a plan the model rates
   costlier than one of torch's that fits as well.
4. The choice becomes ``CheckpointPolicy`` tags on the joint graph (``MUST_RECOMPUTE`` / ``MUST_SAVE``) and torch's
   own partitioner carries it out (extraction, RNG handling, backward ordering), so the graphs inductor compiles are
   ordinary AOTAutograd graphs. The predicted peak is then recomputed on the graphs it returns.

What this path cannot express: a value recomputed more than once (TwRemat-style schedules that recompute inside the
forward, or twice in the backward). Budgets that need those fall below :attr:`CompiledPlan.min_peak_bytes`; use the
eager executor (:func:`memfit.remat.compile` with ``method="budget"`` or ``"twremat"``) there. Random ops (dropout)
are always saved, never recomputed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import math
import operator
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy

from memfit import _compat
from memfit.remat.eager.capture import Rates, _alias_arg, _calibrate, _flops

__all__ = ["CompiledPlan", "MemfitBackend", "backend"]

log = logging.getLogger(__name__)

# Ops inductor runs as extern kernels (or as templates it does not fuse pointwise consumers into on every device):
# their inputs and outputs are real buffers, and recomputing them costs their FLOPs.
_EXTERN = frozenset(
    {
        "mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "_scaled_mm",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward",
        "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward",
        "_flash_attention_backward", "_efficient_attention_backward",
    }
)  # fmt: skip


@dataclass(frozen=True)
class CompiledPlan:
    """memfit's decision for one compiled graph, and what it predicts.

    Byte figures are the step's memory above what exists before it (parameters, the batch): activations, saved
    values, backward temporaries and the gradients the backward returns, as the fused graphs hold them.

    Attributes:
        budget_bytes: the budget in bytes (``None``: no budget, torch's own choice of saved values is kept).
        predicted_peak_bytes: the predicted peak of the graphs handed to inductor.
        full_peak_bytes: the predicted peak with torch's own partitioner (the reference of a fractional budget).
        min_peak_bytes: the smallest predicted peak this path reaches (each value recomputed at most once).
        saved_bytes: bytes the forward saves for the backward.
        recompute_cost_s: predicted seconds of recomputation added to the backward (fusion-aware costs).
        recomputed_ops: forward ops memfit marked for recomputation.
        feasible: ``False`` when the budget is below ``min_peak_bytes``; the min-peak choice is used then.
        solve_seconds: time spent deciding (inductor's compile time is not included).
        compiled_peak_bytes: the peak of inductor's own buffer plan for these graphs, read from the code it
            generated (fusion and buffer reuse as they really are); ``None`` until both graphs are compiled (the
            backward may compile at the first ``backward()``), and with ``compiler="aot_eager"``. When it is known,
            ``feasible`` says whether it fits the budget.
        refined: the first compile's buffer plan overshot the budget or left more than 3% of it unused, and this
            plan comes from a second compile whose model aim was scaled by the ratio of memfit's prediction to
            inductor's peak.
        rates: the device speeds the costs were computed with (given to :func:`backend`, or calibrated in this
            process); ``None`` without a budget.
    """

    budget_bytes: int | None
    predicted_peak_bytes: int
    full_peak_bytes: int
    min_peak_bytes: int
    saved_bytes: int
    recompute_cost_s: float
    recomputed_ops: int
    feasible: bool
    solve_seconds: float
    compiled_peak_bytes: int | None = None
    refined: bool = False
    rates: Rates | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> str:
        mib = 2**20
        budget = "none" if self.budget_bytes is None else f"{self.budget_bytes / mib:.1f} MiB"
        return (
            f"memfit compiled plan: budget {budget}, predicted peak {self.predicted_peak_bytes / mib:.1f} MiB "
            f"(torch's partitioner {self.full_peak_bytes / mib:.1f} MiB, lowest reachable "
            f"{self.min_peak_bytes / mib:.1f} MiB), saves {self.saved_bytes / mib:.1f} MiB, recomputes "
            f"{self.recomputed_ops} ops (+{self.recompute_cost_s * 1e3:.1f} ms predicted)"
            + (
                ""
                if self.compiled_peak_bytes is None
                else f"; inductor's buffer plan peaks at {self.compiled_peak_bytes / mib:.1f} MiB"
            )
            + ("" if self.feasible else "; budget infeasible on the compiled path: min-peak plan used")
        )


# ----------------------------------------------------------------------------------------------- the joint graph
def _hint(x: Any) -> int:
    """A size as an int: a symbolic one (dynamic shapes) by the example value dynamo traced with."""
    if not isinstance(x, torch.SymInt):
        return int(x)
    hint = getattr(x.node, "hint", None)  # SymNode.hint: the traced example's value, or None (unbacked)
    return int(hint) if hint is not None else 1


def _nbytes(val: Any) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    return _hint(val.numel()) * val.element_size()


def _name(node: fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return str(getattr(packet, "__name__", node.target))


def _kind(node: fx.Node) -> str:
    """``"input"``, ``"view"``, ``"extern"``, ``"pointwise"``, ``"getitem"`` or ``"other"`` (reductions and the
    rest: a kernel boundary of its own)."""
    if node.op == "placeholder":
        return "input"
    if node.target is operator.getitem:
        parent = node.args[0]
        if isinstance(parent, fx.Node) and _is_view(parent):
            return "view"  # a piece of split/unbind/chunk: a view of the op's input
        return "getitem"
    if _name(node) in _EXTERN:
        return "extern"
    tags = getattr(node.target, "tags", ())
    if torch.Tag.pointwise in tags:
        return "pointwise"
    if _is_view(node):
        return "view"
    return "other"


def _view_base(node: fx.Node) -> fx.Node | None:
    """The value whose storage a view reads (for a piece of a multi-output view op, that op's input)."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        parent = node.args[0]
        return _alias_arg(parent, int(node.args[1])) if _is_view(parent) else None  # type: ignore[arg-type]
    return _alias_arg(node, 0) if _is_view(node) else None


def _owners(nodes: Iterable[fx.Node], kind: dict[fx.Node, str]) -> dict[fx.Node, fx.Node]:
    """Each value's storage owner: itself, or for a view (of a view ...) the value it aliases."""
    owner: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        base = _view_base(n) if kind[n] == "view" else None
        owner[n] = owner.get(base, base) if base is not None else n
    return owner


def _is_view(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    try:
        return _alias_arg(node, 0) is not None
    except Exception:  # an in-place op: not a view; it is never recomputed (saved)
        return False


def _is_tensors(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)


def _is_random(node: fx.Node) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def _is_impure(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _addmm_fusions(nodes: Iterable[fx.Node]) -> dict[fx.Node, fx.Node]:
    """``{mm: add}`` for each ``add(mm(a, b), c)`` inductor's post-grad pass turns into ``addmm(c, a, b)`` at the
    add (torch/_inductor/fx_passes/post_grad.py, ``addmm``; on GPUs not when every reader of the sum is pointwise).
    The matmul then runs where the add is, and its inputs live until there: with tied weights (an LM head sharing
    the embedding), the logits' gradient is held to the end of the backward."""
    out: dict[fx.Node, fx.Node] = {}
    for add in nodes:
        if (
            add.op != "call_function"
            or _name(add) != "add"
            or len(add.args) != 2
            or add.kwargs.get("alpha", 1) != 1
        ):
            continue
        val = add.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for mm, inp in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
            if not (
                isinstance(mm, fx.Node)
                and _name(mm) == "mm"
                and len(mm.users) == 1
                and isinstance(inp, fx.Node)
            ):
                continue
            ival, mval = inp.meta.get("val"), mm.meta.get("val")
            if (
                not (isinstance(ival, torch.Tensor) and isinstance(mval, torch.Tensor))
                or ival.dtype != mval.dtype
            ):
                continue
            if any(
                a.meta.get("val") is None or a.meta["val"].dtype != ival.dtype for a in mm.all_input_nodes
            ):
                continue
            try:
                torch.broadcast_shapes(tuple(ival.shape), tuple(mval.shape))
            except RuntimeError:
                continue
            if tuple(ival.shape) != tuple(mval.shape) and len(ival.shape) > len(mval.shape):
                continue
            if val.device.type != "cpu" and all(_kind(u) == "pointwise" for u in add.users):
                continue  # should_prefer_unfused_addmm
            out[mm] = add
            break
    return out


def _reads_after_fusion(
    nodes: Sequence[fx.Node], fused: bool
) -> tuple[dict[fx.Node, list[fx.Node]], dict[fx.Node, fx.Node]]:
    """Each node's inputs as inductor runs it (a fused matmul's inputs read at its add), and the fusions
    (``{mm: add}``, :func:`_addmm_fusions`; none when ``fused`` is false)."""
    reads = {n: list(n.all_input_nodes) for n in nodes}
    pairs = _addmm_fusions(nodes) if fused else {}
    for mm, add in pairs.items():
        reads[add] = [a for a in reads[add] if a is not mm] + reads[mm]
        reads[mm] = []
    return reads, pairs


class _Fusion:
    """inductor's store-or-inline choice for each pointwise value of one run of a graph, as its lowering makes it.

    A pointwise value is *inlined*, computed inside the loops of each op that reads it (a pointwise op, a reduction,
    a view that is itself inlined), unless it is kept (a graph output, a saved value), an op inductor does not fuse
    into reads it (an extern kernel, a fallback, an op in ``needs_realized_inputs``), its fused expression reads
    more buffers than ``realize_acc_reads_threshold``, or several ops read it and its expression is dear to repeat
    (``ir.StorageBox.should_realize_on_reuse``): on CPU, one with a transcendental op. inductor counts the reads of
    its loop IR (each indexing of a buffer is a read) against 4; memfit counts distinct fx values against 2, and
    counts ``erf`` as transcendental. Calibrated so on inductor's buffer plans: within 5% on a 6-layer GPT-2 over
    its budgets and on a small GPT, where inductor's own thresholds applied to fx values predicted 27% low.
    Reductions' results are buffers. Values are fed in order, so every input's expression is known when a value is
    decided.
    """

    _READS_ON_REUSE = 2
    _HEAVY_CPU = frozenset({"exp", "log", "log10", "log1p", "log2", "sigmoid", "tanh", "erf"})

    def __init__(self, addmm: Iterable[fx.Node] = (), memo: dict[fx.Node, bool] | None = None) -> None:
        self.rules = _compat.inductor_inline_rules()
        self.addmm = set(addmm)  # adds that became addmm kernels (_addmm_fusions)
        # _fuses_inputs depends on the graph alone: a model keeps one memo for all its runs (same addmm)
        self._fuses = {} if memo is None else memo
        self._expr: dict[
            Any, tuple[frozenset[Any], bool]
        ] = {}  # an inlined value: (buffers read, transcendental)

    def load(self, key: Any) -> tuple[frozenset[Any], bool]:
        """What a fused loop reads to load value ``key``: its buffer, or an inlined value's expression."""
        return self._expr.get(key) or (frozenset((key,)), False)

    def inline(self, key: Any, inputs: Iterable[Any]) -> None:
        """``key`` (a view) reads as its input does."""
        for k in inputs:
            if k in self._expr:
                self._expr[key] = self._expr[k]
            return

    def stored(
        self, key: Any, node: fx.Node, inputs: Iterable[Any], users: Iterable[fx.Node], kept: bool
    ) -> bool:
        """Whether pointwise ``node`` (the value ``key``, reading the values ``inputs``) gets a buffer of its own."""
        reads: set[Any] = set()
        cpu = _device_type(node) == "cpu"
        heavy = cpu and _name(node) in self._HEAVY_CPU
        for k in inputs:
            r, h = self.load(k)
            reads |= r
            heavy = heavy or h
        users = set(users)  # an op reading the value twice is one reader
        store = (
            kept
            or not self.rules.lowered(node.target)
            or any(not self._fuses_inputs(u) for u in users)
            or len(reads) > self.rules.acc_reads["cpu" if cpu else "other"]
            or (len(users) > 1 and (heavy or len(reads) > self._READS_ON_REUSE))
        )
        if not store:
            self._expr[key] = (frozenset(reads), heavy)
        return store

    def _fuses_inputs(self, user: fx.Node) -> bool:
        """Whether ``user`` loads its inputs inside its own loops; a view does when all that read it do (an extern
        kernel reading a view of an inlined value realizes the value)."""
        known = self._fuses.get(user)
        if known is None:
            known = self._fuses[user] = self._loads_inline(user)
        return known

    def _loads_inline(self, user: fx.Node) -> bool:
        if user.op != "call_function" or user in self.addmm:
            return False
        kind = _kind(user)
        if kind == "extern":
            return False
        if kind == "view":
            return all(self._fuses_inputs(u) for u in user.users)
        return kind == "pointwise" or self.rules.lowered(user.target)


def _device_type(node: fx.Node) -> str:
    val = node.meta.get("val")
    return val.device.type if isinstance(val, torch.Tensor) else "cpu"


class _Model:
    """The joint graph as values with sizes, costs and the fusion model, and the step simulator."""

    def __init__(self, gm: fx.GraphModule, num_fwd_outputs: int, rates: Rates, fused: bool) -> None:
        self.fused = fused
        graph = gm.graph
        self.nodes = [n for n in graph.nodes if n.op != "output"]
        out = next(n for n in graph.nodes if n.op == "output")
        outs = [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]
        self.fw_outputs = set(outs[:num_fwd_outputs])
        self.bw_outputs = set(outs[num_fwd_outputs:])
        tangents = {n for n in self.nodes if n.op == "placeholder" and "tangents" in str(n.target)}
        # forward = ancestors of the forward outputs that do not depend on a tangent; backward = the rest
        needs_tangent: set[fx.Node] = set()
        for n in self.nodes:
            if n in tangents or any(a in needs_tangent for a in n.all_input_nodes):
                needs_tangent.add(n)
        fw: set[fx.Node] = set()
        stack = [n for n in self.fw_outputs if n not in needs_tangent]
        while stack:
            n = stack.pop()
            if n in fw or n.op == "placeholder":
                continue
            fw.add(n)
            stack.extend(a for a in n.all_input_nodes if a not in needs_tangent)
        # every piece of a forward multi-output op is a forward value (an attention's logsumexp, a norm's rstd)
        for n in list(fw):
            fw.update(u for u in n.users if u.target is operator.getitem and u not in needs_tangent)
        self.fw = [n for n in self.nodes if n in fw]
        self._fw_set = fw
        self.bw = [n for n in self.nodes if n.op == "call_function" and n not in fw]
        # backward ops that read no tangent (e.g. an activation's derivative): torch's partitioner may move them
        # into the forward and save their result; memfit keeps them in the backward, where it models them
        self.unclaimed = [n for n in self.bw if n not in needs_tangent]
        self._unclaimed_set = set(self.unclaimed)
        self.kind = {n: _kind(n) for n in self.nodes}
        # a view's memory is its base's: map every value to the value that owns its storage
        self.owner = _owners(self.nodes, self.kind)
        self.bytes = {
            n: 0 if self.kind[n] in ("view", "input") else _nbytes(n.meta.get("val")) for n in self.nodes
        }
        self.cost: dict[fx.Node, float] = {}
        for n in self.fw:
            if self.kind[n] == "extern":
                read = sum(_nbytes(a.meta.get("val")) for a in n.all_input_nodes)
                self.cost[n] = (
                    _flops(n) / rates.flops_per_s
                    + (read + self.bytes[n]) / rates.bytes_per_s
                    + rates.op_overhead_s
                )
            elif self.kind[n] in ("view", "getitem"):
                self.cost[n] = 0.0
            else:  # fused into its consumer: about the bytes it writes, once more
                self.cost[n] = self.bytes[n] / rates.bytes_per_s
        self.fixed = {  # forward values never recomputed: random, in-place, non-tensor, or saved by torch's rule
            n
            for n in self.fw
            if _is_random(n)
            or _is_impure(n)
            or not _is_tensors(n.meta.get("val"))
            or n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE  # collectives, effectful ops
        }
        # a multi-output op is recomputed as one: the bytes it frees are its saved outputs'
        self.outputs_of = {
            n: [u for u in n.users if u.target is operator.getitem]
            for n in self.fw
            if self.kind[n] != "getitem"
        }
        for n in list(self.fixed):  # the outputs of a fixed multi-output op stay with it
            self.fixed.update(u for u in n.users if u.target is operator.getitem)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        # the backward's matmuls inductor fuses into a following add (both backward ops, never recomputed)
        self.reads, self.fused_mm = _reads_after_fusion(self.nodes, fused)
        if any(a in self._fw_set for add in self.fused_mm.values() for a in [add, *add.all_input_nodes]):
            self.reads, self.fused_mm = _reads_after_fusion(
                self.nodes, False
            )  # an add of the forward: as it is
        self.addmm = set(self.fused_mm.values())
        self._fuses_memo: dict[fx.Node, bool] = {}

    # -------------------------------------------------------------------------------------------- fusion
    def _materialized(
        self,
        key: tuple[fx.Node, bool],
        users: Sequence[fx.Node],
        kept: bool,
        fusion: _Fusion,
        inputs: list[Any],
    ) -> bool:
        n = key[0]
        kind = self.kind[n]
        if n in self.fused_mm:
            return False  # a matmul inductor fuses into the add that reads it: it runs, and writes, there
        if kind == "view":
            fusion.inline(key, inputs)
            return False
        if kind == "input" or self.bytes[n] == 0:
            return False
        if not self.fused or kind in ("extern", "other", "getitem") or n in self.addmm:
            return True
        return fusion.stored(key, n, inputs, users, kept)

    # -------------------------------------------------------------------------------------------- simulation
    def simulate(self, recompute: set[fx.Node]) -> tuple[int, int]:
        """``(peak, saved bytes)`` of the step when the forward values in ``recompute`` are recomputed in the
        backward and every other forward value the backward needs is saved."""
        saved = self.saved_set(recompute)
        bw_seq = self._backward_order(recompute)
        seq = [(n, False) for n in self.fw] + bw_seq
        # last use of each storage owner over the whole sequence; recomputed copies are distinct values
        position: dict[tuple[fx.Node, bool], int] = {key: i for i, key in enumerate(seq)}
        last: dict[tuple[fx.Node, bool], int] = {}
        users: dict[tuple[fx.Node, bool], list[fx.Node]] = {}
        for i, (n, again) in enumerate(seq):
            for a in self.reads[n]:
                src = self._source(a, n, again, recompute)
                if src is None:
                    continue
                users.setdefault(src, []).append(n)
                # the storage read: a view's base, in the copy the reader sees (a recomputed view of a saved base
                # reads the saved base)
                owner = self._source(self.owner[a], n, again, recompute)
                if owner is not None:
                    last[owner] = max(last.get(owner, -1), i)
        for n in self.fw_outputs:
            if (n, False) in position:
                last[(self.owner[n], False)] = len(seq)
        for n in self.bw_outputs:
            if (n, False) in position:
                last[(self.owner[n], False)] = len(seq)
        live = 0
        peak = 0
        frees: dict[int, int] = {}
        fusion = _Fusion(self.addmm, self._fuses_memo)
        for i, key in enumerate(seq):
            n, again = key
            kept = (n in saved and not again) or n in self.bw_outputs or n in self.fw_outputs
            inputs = [self._source(a, n, again, recompute) or a for a in self.reads[n]]
            if self._materialized(key, users.get(key, ()), kept, fusion, inputs):
                size = self.bytes[n]
                live += size
                end = last.get(key, i)
                frees[end] = frees.get(end, 0) + size
            peak = max(peak, live)
            live -= frees.pop(i, 0)
        return peak, sum(self.bytes[n] for n in saved)

    def _source(
        self, a: fx.Node, reader: fx.Node, again: bool, recompute: set[fx.Node]
    ) -> tuple[fx.Node, bool] | None:
        """Which copy of ``a`` the op ``reader`` reads: a recomputation or a backward op reads the recomputed copy
        of a recomputed value, a forward op the forward's."""
        if a.op == "placeholder":
            return None
        return (a, a in recompute and (again or reader not in self._fw_set))

    def saved_set(self, recompute: set[fx.Node]) -> set[fx.Node]:
        """Forward values (storage owners) the backward reads, directly or through recomputed values."""
        return self._reads(recompute)[0]

    def recomputed(self, recompute: set[fx.Node]) -> set[fx.Node]:
        """The values of ``recompute`` the backward really recomputes: those it reads, directly or through other
        recomputed values (a value no backward op needs is not recomputed, whatever its tag)."""
        return self._reads(recompute)[1]

    def _reads(self, recompute: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
        """``(saved, recomputed)``: walk back from the backward's forward inputs through recomputed values; every
        value reached is recomputed if it is in ``recompute``, else saved (its storage owner)."""
        saved: set[fx.Node] = set()
        stack = [a for n in self.bw for a in n.all_input_nodes if a in self._fw_set]
        seen: set[fx.Node] = set()
        while stack:
            a = stack.pop()
            if a in seen:
                continue
            seen.add(a)
            if a in recompute:
                stack.extend(x for x in a.all_input_nodes if x in self._fw_set)
            else:
                saved.add(self.owner[a])
        return saved, seen & recompute

    def _backward_order(self, recompute: set[fx.Node]) -> list[tuple[fx.Node, bool]]:
        """The backward as AOTAutograd orders it (``reordering_to_mimic_autograd_engine``): the ops that read a
        tangent in their original order, each preceded by the not-yet-computed recomputed and tangent-free ops it
        needs, those in their original order."""
        lazy = recompute | self._unclaimed_set
        done: set[fx.Node] = set()
        seq: list[tuple[fx.Node, bool]] = []
        for n in self.bw:
            if n in self._unclaimed_set:
                continue
            need: set[fx.Node] = set()
            stack = [a for a in n.all_input_nodes if a in lazy and a not in done]
            while stack:
                a = stack.pop()
                if a in need or a in done:
                    continue
                need.add(a)
                stack.extend(x for x in a.all_input_nodes if x in lazy and x not in done and x not in need)
            for a in sorted(need, key=self.order.__getitem__):
                done.add(a)
                seq.append((a, a in recompute))
            seq.append((n, False))
        return seq

    def recompute_cost(self, recompute: set[fx.Node], start: set[fx.Node]) -> float:
        """Predicted seconds of recomputation added to the backward (``start``, the free views, excluded)."""
        return math.fsum(self.cost[n] for n in self.recomputed(recompute) if n not in start)  # order-free

    # -------------------------------------------------------------------------------------------- greedy
    def candidates(self) -> list[fx.Node]:
        """Forward ops that may be recomputed (the outputs of a multi-output op go with it, not alone)."""
        return [n for n in self.fw if n not in self.fixed and self.kind[n] not in ("input", "getitem")]

    def _values(self, n: fx.Node) -> list[fx.Node]:
        """The values op ``n`` makes: itself, or its getitems."""
        return self.outputs_of.get(n) or [n]

    def greedy(
        self, start: set[fx.Node], cost: dict[fx.Node, float] | None = None, limit_s: float = 30.0
    ) -> list[list[fx.Node]]:
        """Moves of forward values from saved to recomputed, in memfit's order: each move the one that frees the
        most saved bytes per second of added recomputation, given the moves before it.

        A move recomputes one saved value ``c`` and either saves whatever of its inputs is not yet available
        (gain: ``c``'s bytes less theirs), or recomputes those inputs too, back to values already saved or
        parameters (gain: all of ``c``'s bytes, cost: the whole chain). The second kind is what reaches per-block
        checkpointing: a block's interior recomputed from its saved input. ``cost`` replaces :attr:`cost` (seconds
        to recompute each op) in the ratios.
        """
        cost = self.cost if cost is None else cost
        recompute = set(start)
        moves: list[list[fx.Node]] = []
        cands = [n for n in self.candidates() if n not in recompute]
        t0 = time.perf_counter()
        saved = self.saved_set(recompute)
        while time.perf_counter() - t0 < limit_s:
            best: list[fx.Node] | None = None
            best_ratio = 0.0
            for c in cands:
                if c in recompute:
                    continue
                freed = sum(self.bytes[v] for v in self._values(c) if self.owner[v] is v and v in saved)
                if freed <= 0:
                    continue
                missing = self._missing_inputs(c, saved, recompute)
                simple_gain = freed - sum(self.bytes[x] for x in missing)
                if simple_gain > 0:
                    ratio = simple_gain / (cost[c] + 1e-9)
                    if ratio > best_ratio:
                        best, best_ratio = [c], ratio
                if missing:
                    chain = self._chain(c, saved, recompute)
                    if chain is not None:
                        ratio = freed / (sum(cost[x] for x in chain) + 1e-9)
                        if ratio > best_ratio:
                            best, best_ratio = chain, ratio
            if best is None:
                break
            move: list[fx.Node] = []
            for c in best:
                for g in [c, *self.outputs_of.get(c, [])]:
                    if g not in recompute:
                        recompute.add(g)
                        move.append(g)
            moves.append(move)
            saved = self.saved_set(recompute)
        return moves

    def _missing_inputs(self, c: fx.Node, saved: set[fx.Node], recompute: set[fx.Node]) -> set[fx.Node]:
        """Storage owners among ``c``'s forward inputs that are neither saved nor recomputed."""
        return {
            o
            for o in (self.owner[x] for x in c.all_input_nodes if x in self._fw_set)
            if o in self._fw_set and o not in saved and o not in recompute
        }

    def _chain(
        self, c: fx.Node, saved: set[fx.Node], recompute: set[fx.Node], cap: int = 256
    ) -> list[fx.Node] | None:
        """``c`` and the ancestors needed to recompute it from saved values and parameters, in topological order
        (``None`` if that reaches a value that cannot be recomputed or more than ``cap`` ops)."""
        chain: set[fx.Node] = set()
        stack = [c]
        while stack:
            x = stack.pop()
            if x in chain:
                continue
            if x is not c and x in self.fixed:
                return None
            chain.add(x)
            if len(chain) > cap:
                return None
            for a in x.all_input_nodes:
                if a not in self._fw_set or a in recompute:
                    continue
                o = self.owner[a]
                if o in saved and a is o:
                    continue
                if a.target is operator.getitem and isinstance(a.args[0], fx.Node):
                    a = a.args[0]  # a piece of a multi-output op: recompute the op
                    if a in recompute or a in chain:
                        continue
                if a is not o and o in saved:
                    continue  # a view of a saved value: free
                stack.append(a)
        return sorted(chain, key=self.order.__getitem__)


def _default_recompute(model: _Model) -> set[fx.Node]:
    """Views are always recomputed from their saved base (free); every other forward value starts saved."""
    return {n for n in model.candidates() if model.kind[n] == "view"}


def _tag(model: _Model, recompute: set[fx.Node]) -> None:
    """Write the choice as checkpoint-policy tags, which torch's min-cut partitioner obeys."""
    for n in [*model.fw, *model.unclaimed]:
        if n.op != "call_function" or n in model.fixed:
            continue
        if n in recompute or n not in model._fw_set:
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        else:
            n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        n.meta.pop("ac_graph_id", None)  # one region: no boundary saves between checkpoint regions


def _graph_peak(
    fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, num_fwd_outputs: int, fused: bool
) -> tuple[int, int]:
    """``(peak, saved bytes)`` of a partitioned pair under the same fusion model as :class:`_Model`: the forward,
    then the backward, whose saved inputs are freed after their last use (inductor's boxed calling convention lets
    it). A saved parameter or input costs nothing (it exists anyway); a saved view costs its base once."""
    fw_nodes = [n for n in fw_gm.graph.nodes if n.op != "output"]
    fw_kind = {n: _kind(n) for n in fw_nodes}
    fw_owner = _owners(fw_nodes, fw_kind)
    fw_out = next(n for n in fw_gm.graph.nodes if n.op == "output")
    saved = [a for a in pytree.tree_leaves(fw_out.args[0]) if isinstance(a, fx.Node)][num_fwd_outputs:]
    # each saved storage is carried once, by the first saved value that holds it
    carried: dict[str, int] = {}
    seen: set[fx.Node] = set()
    for a in saved:
        root = fw_owner[a]
        size = 0 if root.op == "placeholder" or root in seen else _nbytes(root.meta.get("val"))
        seen.add(root)
        carried[a.name] = size
    fw_peak, _ = _run_peak(fw_nodes, fw_kind, fw_owner, keep=set(saved), carry={}, fused=fused)
    bw_nodes = [n for n in bw_gm.graph.nodes if n.op != "output"]
    bw_kind = {n: _kind(n) for n in bw_nodes}
    bw_out = next(n for n in bw_gm.graph.nodes if n.op == "output")
    grads = {a for a in pytree.tree_leaves(bw_out.args[0]) if isinstance(a, fx.Node)}
    carry = {n: carried[n.name] for n in bw_nodes if n.op == "placeholder" and n.name in carried}
    bw_peak, _ = _run_peak(
        bw_nodes, bw_kind, _owners(bw_nodes, bw_kind), keep=grads, carry=carry, fused=fused
    )
    return max(fw_peak, bw_peak + _held_bytes(fw_gm, num_fwd_outputs)), sum(carried.values())


def _held_bytes(fw_gm: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Bytes the forward returns to the caller (the loss, any logits), held through the backward; storage the
    forward also saves is counted with the saved values."""
    nodes = [n for n in fw_gm.graph.nodes if n.op != "output"]
    owner = _owners(nodes, {n: _kind(n) for n in nodes})
    out = next(n for n in fw_gm.graph.nodes if n.op == "output")
    args = [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]
    saved = {owner[a] for a in args[num_fwd_outputs:]}
    returned = {owner[a] for a in args[:num_fwd_outputs]}
    return sum(_nbytes(o.meta.get("val")) for o in returned - saved if o.op != "placeholder")


def _run_peak(
    nodes: list[fx.Node],
    kind: dict[fx.Node, str],
    owner: dict[fx.Node, fx.Node],
    keep: set[fx.Node],
    carry: dict[fx.Node, int],
    fused: bool,
) -> tuple[int, int]:
    """``(peak, live at the end)`` of one graph run in order: ``carry`` are inputs that occupy memory until their
    last use, ``keep`` values that live to the end (outputs)."""
    reads, fused_mm = _reads_after_fusion(nodes, fused)
    addmm = set(fused_mm.values())
    last: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in reads[n]:
            last[owner[a]] = i
    for n in keep:  # an output that is a view (a transposed weight gradient) keeps its base
        last[owner[n]] = len(nodes)
    frees: dict[int, int] = {}
    live = 0
    for p, size in carry.items():
        live += size
        end = last.get(owner[p], -1)
        frees[end] = frees.get(end, 0) + size
    live -= frees.pop(-1, 0)
    peak = live
    fusion = _Fusion(addmm)
    for i, n in enumerate(nodes):
        k = kind[n]
        if k == "view":
            fusion.inline(n, n.all_input_nodes)
        # a matmul fused into its add runs, and writes, there
        size = (
            _nbytes(n.meta.get("val")) if n.op != "placeholder" and k != "view" and n not in fused_mm else 0
        )
        if size > 0:
            materialized = (
                not fused
                or k in ("extern", "other", "getitem")
                or n in addmm
                or fusion.stored(n, n, reads[n], list(n.users), n in keep)
            )
            if materialized:
                live += size
                end = last.get(n, i)
                frees[end] = frees.get(end, 0) + size
        peak = max(peak, live)
        live -= frees.pop(i, 0)
    return peak, live + sum(frees.values())


# ----------------------------------------------------------------------------------------------- the partitioner
def _make_partitioner(backend: MemfitBackend) -> Any:
    _, _, partitioner_base, min_cut = _compat.inductor_partitioning()

    class _MemfitPartitioner(partitioner_base):  # type: ignore[misc, valid-type]
        def __call__(
            self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
        ) -> tuple[fx.GraphModule, fx.GraphModule]:
            return backend._partition(gm, joint_inputs, min_cut, **kwargs)

        def uuid(self) -> Any:
            # inductor's FX graph cache keys on the graphs this returns (a compiled graph is the same whatever
            # budget led to it) and on this id: which partitioner code made them. AOTAutograd's cache, keyed
            # before partitioning, is off for memfit's compiles (MemfitBackend.__call__).
            return _source_hash()

        def __reduce__(self) -> tuple[Any, ...]:
            # inductor pickles its config, this object included, into the FX graph cache key: pickle as the id
            # (the partitioned graphs in the key say the rest)
            return (str, (f"memfit-partitioner-{_source_hash()}",))

    return _MemfitPartitioner()


class MemfitBackend:
    """A ``torch.compile`` backend: inductor, with memfit choosing what the forward saves. See :func:`backend`."""

    def __init__(
        self,
        budget: int | float | None,
        *,
        compiler: str = "inductor",
        refine: bool = True,
        verbose: bool = False,
        rates: Rates | None = None,
    ) -> None:
        if rates is not None and not isinstance(rates, Rates):
            raise TypeError(
                f"rates must be a memfit.remat.Rates (e.g. memfit.remat.calibrate('cpu')) or None, got {rates!r}"
            )
        self.rates = rates
        self.refine = refine and budget is not None and compiler == "inductor"
        self._scale = 1.0
        if compiler not in ("inductor", "aot_eager"):
            raise ValueError(f"compiler must be 'inductor' or 'aot_eager', got {compiler!r}")
        self.compiler = compiler
        self._fused = compiler == "inductor"  # aot_eager runs every op unfused: every value is materialized
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise TypeError(f"budget must be an int (bytes), a float in (0, 1] or None, got {budget!r}")
            if isinstance(budget, float) and not 0.0 < budget <= 1.0:
                raise ValueError(
                    f"a fractional budget must be in (0, 1] (of the step's predicted peak with torch's own "
                    f"partitioner); got {budget}. Pass an int for bytes."
                )
            if isinstance(budget, int) and budget <= 0:
                raise ValueError(f"a byte budget must be positive, got {budget}")
        self.budget = budget
        self.verbose = verbose
        self.plans: list[CompiledPlan] = []
        self._fw_peak: dict[int, int] = {}
        self._held: dict[
            int, int
        ] = {}  # bytes the forward returns to the caller (the loss), held in the backward

    def __repr__(self) -> str:
        return f"memfit.remat.backend(budget={self.budget!r}, compiler={self.compiler!r})"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        compile_fx, inductor_config, _, min_cut = _compat.inductor_partitioning()
        if self.compiler == "aot_eager":

            def partition(joint: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any) -> Any:
                return self._partition(joint, joint_inputs, min_cut, compiler="inductor", **kwargs)

            return _compat.aot_eager_backend(partition)(gm, example_inputs)
        # AOTAutograd's cache would skip the partitioner, and with it memfit's plan (its key does not hold the
        # budget): off. Inductor's FX graph cache, keyed on the partitioned graphs, stays as configured. The
        # backward is compiled now, not at the first backward(), so that inductor's buffer plan of the whole step
        # is known here.
        patch = inductor_config.patch(custom_partitioner_fn=_make_partitioner(self))
        self._scale = 1.0
        with patch, _compat.eager_backward_compile(), _compat.no_autograd_cache():
            first = compile_fx(
                copy.deepcopy(gm) if self.refine else gm, example_inputs, inner_compile=self._inner_compile
            )
            plan = self.plans[-1] if self.plans else None
            if not (
                self.refine
                and plan is not None
                and plan.budget_bytes is not None
                and plan.compiled_peak_bytes is not None
            ):
                return first
            over = plan.compiled_peak_bytes > plan.budget_bytes
            under = plan.compiled_peak_bytes < (1.0 - _SLACK) * plan.budget_bytes
            if not (over or under):
                return first
            # inductor's plan misses the budget memfit's model aimed at: over it, or leaving more than _SLACK of it
            # unused (recomputing more than needed). Aim the model by the ratio of the two (a little low) and compile
            # once more. Over: keep whichever peaks lower. Under: keep the second if it fits and recomputes less.
            self._scale = _AIM * plan.predicted_peak_bytes / plan.compiled_peak_bytes
            self.plans.pop()
            second = compile_fx(gm, example_inputs, inner_compile=self._inner_compile)
            again = self.plans[-1]
            if again.compiled_peak_bytes is not None and (
                again.compiled_peak_bytes <= plan.compiled_peak_bytes
                if over
                else again.compiled_peak_bytes <= plan.budget_bytes
                and again.recompute_cost_s < plan.recompute_cost_s
            ):
                self.plans[-1] = dataclasses.replace(again, refined=True)
                return second
            self.plans[-1] = plan
            return first

    def _inner_compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        """Inductor's own ``compile_fx_inner``, then its buffer plan read from the generated code."""
        from torch._inductor.compile_fx import compile_fx_inner

        out = compile_fx_inner(gm, example_inputs, **kwargs)
        source = getattr(out, "source_code", None)
        if not self.plans or not isinstance(source, str):
            return out
        arg_bytes = {
            n.name: 0
            if n.name.startswith("primals")
            else _nbytes(n.meta.get("val"))  # parameters exist anyway
            for n in gm.graph.nodes
            if n.op == "placeholder"
        }
        peak = _compat.inductor_wrapper_peak(source, arg_bytes)
        i = len(self.plans) - 1
        if peak is None:
            return out
        if not kwargs.get("is_backward", False):
            self._fw_peak[i] = peak
        elif i in self._fw_peak:
            plan = self.plans[i]
            whole = max(self._fw_peak.pop(i), peak + self._held.get(i, 0))
            feasible = plan.feasible if plan.budget_bytes is None else whole <= plan.budget_bytes
            self.plans[i] = dataclasses.replace(plan, compiled_peak_bytes=whole, feasible=feasible)
        return out

    # ------------------------------------------------------------------------------------------------
    def _partition(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], min_cut: Any, **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        t0 = time.perf_counter()
        num_fwd_outputs = int(kwargs["num_fwd_outputs"])
        # torch's own choice first (it also runs dead-code elimination and CSE on ``gm``): the reference of a
        # fractional budget, and the answer when there is no budget
        ref_fw, ref_bw = min_cut(gm, joint_inputs, **kwargs)
        full_peak, full_saved = _graph_peak(ref_fw, ref_bw, num_fwd_outputs, self._fused)
        if self.budget is None:
            plan = CompiledPlan(None, full_peak, full_peak, full_peak, full_saved, 0.0, 0, True, 0.0)
            return self._done(plan, ref_fw, ref_bw, t0, num_fwd_outputs)
        # torch's partitioner hands ``gm`` a fresh (CSE'd) copy of its graph on every call, tags copied along:
        # memfit's model and tags live on this one, which goes back into ``gm`` before each later call
        graph = gm.graph
        rates = self.rates if self.rates is not None else _calibrate(_device_of(gm))
        model = _Model(gm, num_fwd_outputs, rates, self._fused)

        budget = int(self.budget * full_peak) if isinstance(self.budget, float) else int(self.budget)
        target = int(budget * self._scale)  # the model's aim: lower than the budget on a refining compile
        start = _default_recompute(model)
        # torch's own choices are candidates too: its default partition (computed above) and its knapsack's
        torch_sets = [_recomputed_by(model, ref_fw, num_fwd_outputs)]
        torch_sets += _torch_choices(model, gm, graph, joint_inputs, min_cut, kwargs)
        frontier = _frontier(model, start, torch_sets)
        # the cheapest point whose predicted peak fits (the frontier's peaks rise as its costs fall, so the choice
        # is monotone in the budget); where the partitioned graphs exceed the target after all, the next lower
        # points, and at last the lowest
        fits = [i for i, point in enumerate(frontier) if point[0] <= target]
        tries = list(range(fits[-1], max(fits[-1] - 3, -1), -1)) if fits else []
        tries += [] if 0 in tries else [0]
        for attempt, i in enumerate(tries):
            chosen = frontier[i][2]
            gm.graph = graph
            _tag(model, chosen)
            fw_gm, bw_gm = min_cut(gm, joint_inputs, **kwargs)
            peak, saved_bytes = _graph_peak(fw_gm, bw_gm, num_fwd_outputs, self._fused)
            log.debug(
                "frontier point %d: model peak %d, partitioned graphs %d (attempt %d)",
                i,
                frontier[i][0],
                peak,
                attempt,
            )
            if peak <= target:
                break
        # on a refining compile aimed above the budget (memfit's model ran high), inductor's plan judges the fit
        feasible = peak <= max(budget, target)
        if not feasible:
            warnings.warn(
                f"memfit.remat.backend: budget {budget / 2**20:.1f} MiB is below the lowest peak the compiled path "
                f"reaches ({peak / 2**20:.1f} MiB predicted); using that. Lower budgets need values recomputed "
                "more than once: use memfit.remat.compile (the eager executor) there.",
                stacklevel=2,
            )
        plan = CompiledPlan(
            budget_bytes=budget,
            predicted_peak_bytes=peak,
            full_peak_bytes=full_peak,
            min_peak_bytes=min(frontier[0][0], peak),
            saved_bytes=saved_bytes,
            recompute_cost_s=model.recompute_cost(chosen, start),
            recomputed_ops=sum(
                1 for n in model.recomputed(chosen) if n not in start and model.kind[n] != "getitem"
            ),
            feasible=feasible,
            solve_seconds=0.0,
            rates=rates,
        )
        return self._done(plan, fw_gm, bw_gm, t0, num_fwd_outputs)

    def _done(
        self,
        plan: CompiledPlan,
        fw_gm: fx.GraphModule,
        bw_gm: fx.GraphModule,
        t0: float,
        num_fwd_outputs: int,
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        plan = dataclasses.replace(plan, solve_seconds=time.perf_counter() - t0)
        self._held[len(self.plans)] = _held_bytes(fw_gm, num_fwd_outputs)
        self.plans.append(plan)
        if self.verbose:
            print(plan.report())
        log.info("%s", plan.report())
        return fw_gm, bw_gm


# Refinement (MemfitBackend.__call__): a second compile when inductor's buffer plan exceeds the budget or leaves more
# than _SLACK of it unused; the model's aim is scaled by _AIM times the ratio of the model's peak to inductor's.
_SLACK = 0.03
_AIM = 0.99

# Multipliers of the matmul (extern kernel) costs in the greedy passes. The calibrated rates are noisy and the
# ratio of matmul to memory cost orders the greedy's moves; passes under a few ratios reach points (and lowest
# peaks) that one pass misses. Every point is then priced with the calibrated costs.
_COST_SCALES = (1.0, 4.0, 0.25)


# Levels of torch's own ``activation_memory_budget`` whose choices join memfit's candidates (_torch_choices): the
# knob's range at three points. Each costs one call of torch's knapsack partitioner (2.5 s on the benchmark's GPT-2,
# where memfit's frontier dominated torch's choices at 0.8, 0.6, 0.4, 0.3, 0.2 and 0.1, and torch's 0.5 choice
# joined the frontier between two of memfit's points).
_TORCH_LEVELS = (0.8, 0.5, 0.2)


def _torch_choices(
    model: _Model,
    gm: fx.GraphModule,
    graph: fx.Graph,
    joint_inputs: Sequence[object],
    min_cut: Any,
    kwargs: dict[str, Any],
) -> list[set[fx.Node]]:
    """What torch's memory-budget partitioner (a knapsack over the saved activations' bytes and estimated runtime)
    recomputes at each of :data:`_TORCH_LEVELS`, as recompute sets of ``model``.

    They join the greedy passes' prefixes as candidates, priced and simulated by memfit's model like the rest: a
    budget then never gets a plan the model rates costlier than torch's own knob at the same memory. Each is one more
    call of torch's partitioner (``gm.graph`` is put back before each)."""
    sets: list[set[fx.Node]] = []
    config = _compat.functorch_config()
    for level in _TORCH_LEVELS:
        gm.graph = graph
        try:
            with config.patch(activation_memory_budget=level):
                fw_gm, _ = min_cut(gm, joint_inputs, **kwargs)
        except Exception as exc:  # torch's knapsack is an option, not memfit's plan: go on without it
            log.debug("torch's partitioner at activation_memory_budget=%s failed: %s", level, exc)
            continue
        sets.append(_recomputed_by(model, fw_gm, int(kwargs["num_fwd_outputs"])))
    gm.graph = graph
    return sets


def _recomputed_by(model: _Model, fw_gm: fx.GraphModule, num_fwd_outputs: int) -> set[fx.Node]:
    """The recompute set of ``model`` that a partitioned forward stands for: every candidate it does not save (nor
    the storage of a view it saves).

    torch's partitioner may also run backward ops that read no gradient in the forward and save their results (a
    weight's transpose, an activation's derivative); memfit's model keeps those ops in the backward, so it saves
    the forward values they read instead (about the same bytes for a pointwise op)."""
    fw_by_name = {n.name: n for n in model.fw}
    unclaimed = {n.name: n for n in model.unclaimed}
    out = next(n for n in fw_gm.graph.nodes if n.op == "output")
    saved = [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)][num_fwd_outputs:]
    kept = {fw_by_name[a.name] for a in saved if a.name in fw_by_name}
    stack = [unclaimed[a.name] for a in saved if a.name in unclaimed]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a in model._fw_set:
                kept.add(a)
            elif a in model._unclaimed_set:
                stack.append(a)
    kept |= {model.owner[n] for n in kept}
    return {n for n in model.candidates() if n not in kept}


def _frontier(
    model: _Model, start: set[fx.Node], extra: Iterable[set[fx.Node]] = ()
) -> list[tuple[int, float, set[fx.Node]]]:
    """The Pareto frontier of ``(predicted peak, recompute cost, recompute set)`` over the prefixes of the greedy
    passes and the ``extra`` recompute sets: peaks ascending, costs strictly descending (no point is both higher
    and costlier than another)."""
    points: dict[frozenset[fx.Node], tuple[int, float, set[fx.Node]]] = {}

    def add(r: set[fx.Node]) -> None:
        key = frozenset(r)
        if key not in points:
            points[key] = (model.simulate(r)[0], model.recompute_cost(r, start), r)

    for r in extra:
        add(r | start)
    for scale in _COST_SCALES:
        cost = (
            model.cost
            if scale == 1.0
            else {n: c * scale if model.kind[n] == "extern" else c for n, c in model.cost.items()}
        )
        prefixes = [set(start)]
        for move in model.greedy(start, cost):
            prefixes.append(prefixes[-1] | set(move))
        for r in _sampled(prefixes):
            add(r)
    frontier: list[tuple[int, float, set[fx.Node]]] = []
    for point in sorted(points.values(), key=lambda p: (p[0], p[1])):
        if not frontier or point[1] < frontier[-1][1]:
            frontier.append(point)
    return frontier


@functools.cache
def _source_hash() -> str:
    """A hash of the sources that make memfit's choice (this module and the cost model's)."""
    from memfit.remat.eager import capture as _capture

    h = hashlib.sha256()
    for path in (__file__, _capture.__file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _sampled(prefixes: list[set[fx.Node]], most: int = 100) -> list[set[fx.Node]]:
    """At most ``most`` evenly spaced prefixes (always the first and the last): simulating each is linear in the
    graph."""
    n = len(prefixes)
    if n <= most:
        return prefixes
    step = n / most
    idx = sorted({int(i * step) for i in range(most)} | {n - 1})
    return [prefixes[i] for i in idx]


def _device_of(gm: fx.GraphModule) -> torch.device:
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def backend(
    budget: int | float | None = None,
    *,
    compiler: str = "inductor",
    refine: bool = True,
    verbose: bool = False,
    rates: Rates | None = None,
) -> MemfitBackend:
    """A ``torch.compile`` backend: inductor, with memfit's solver choosing what the forward saves.

    ::

        be = memfit.remat.backend(budget=0.4)
        step = torch.compile(lambda batch: loss_fn(model, batch), backend=be)
        step(batch).backward()
        print(be.plans[0].report())

    Args:
        budget: the step's peak memory above its starting point, as bytes (``int``) or as a fraction in
            ``(0, 1]`` of the peak memfit predicts for torch's own partitioner; ``None`` keeps torch's choice.
        compiler: ``"inductor"`` (fused kernels: the point of this path) or ``"aot_eager"`` (the same partitioned
            graphs run op by op: compiles in seconds, for debugging and tests; its memory is not the fused one).
        refine: when inductor's own buffer plan (read from the code it generated) overshoots the budget, or leaves
            more than 3% of it unused (memfit's model ran high, and the step recomputes more than it must), compile
            once more with memfit's model aimed by the ratio of the two (up to twice the compile time); the second
            plan is kept if it peaks lower (overshoot) or fits and recomputes less (unused budget).
        verbose: print each graph's plan when it is compiled.
        rates: the device speeds that price recomputation (:class:`memfit.remat.Rates`); ``None`` measures them in
            this process (:func:`memfit.remat.calibrate`). Measured speeds move between processes on a shared
            machine, and the plan can move with them: give every process the same ``Rates`` for the same plan.

    Returns:
        The backend; its ``plans`` list gains one :class:`CompiledPlan` per compiled graph.
    """
    return MemfitBackend(budget, compiler=compiler, refine=refine, verbose=verbose, rates=rates)
