"""The memory and cost model of a partition: a step's peak and recomputation cost for a choice of saved values.

:class:`_Model` holds the joint graph (forward and backward) as values with sizes and costs, simulates the step for
a recompute set (the forward, then the backward in AOTAutograd's order, under inductor's fusion:
:mod:`memfit.remat.compiled.fusion`), and makes the greedy moves from saved to recomputed (bytes freed per second
recomputed). :func:`_graph_peak` applies the same model to the forward and backward graphs a partitioner returns.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy

from memfit.remat.compiled.fusion import (
    _INDEXING,
    _RESHAPE,
    _call_scratch,
    _ends_stretch,
    _flat_loads,
    _Fusion,
    _gradient_sum_groups,
    _inplace,
    _is_impure,
    _is_random,
    _is_tensors,
    _kernels,
    _kind,
    _layout_copies,
    _layout_opt,
    _loops,
    _name,
    _nbytes,
    _owners,
    _reads_after_fusion,
    _uses,
)
from memfit.remat.eager.costs import Rates, _flops


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
        self.tangents = tangents
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
        # nodes no fused kernel holds (fusion._kernels)
        self._ends_stretch = {
            n: n in self.fused_mm or n in self.addmm or _ends_stretch(n, self.kind[n]) for n in self.nodes
        }
        self._fuses_memo: dict[fx.Node, bool] = {}
        # inductor's channels-last copies of the forward's inputs (parameters, the batch), live from the forward's
        # start to their last reader, and the scratch of oneDNN convolution calls (fusion._layout_copies,
        # fusion._call_scratch): no choice of saved values removes them, but they set where the peak is
        self.copies = _layout_copies(self.fw) if fused else {}
        self.channels_last = fused and _layout_opt(self.fw)
        self.scratch = {
            n: s + _pieces_bytes(n)
            for n in self.nodes
            if fused and (s := _call_scratch(n, self.channels_last and _is_4d(n)))
        }

    # -------------------------------------------------------------------------------------------- fusion
    def _materialized(
        self,
        key: tuple[fx.Node, bool],
        users: Sequence[fx.Node],
        kept: bool,
        fusion: _Fusion,
        inputs: list[Any],
        uses: int | None = None,
    ) -> bool:
        n = key[0]
        kind = self.kind[n]
        if n in self.fused_mm:
            return False  # a matmul inductor fuses into the add that reads it: it runs, and writes, there
        if kind == "view":
            fusion.inline(key, inputs, n)
            return False
        if kind == "input" or self.bytes[n] == 0:
            return False
        if not self.fused or kind in ("extern", "other", "getitem") or n in self.addmm:
            return True
        return fusion.stored(key, n, inputs, users, kept, uses)

    # -------------------------------------------------------------------------------------------- simulation
    def simulate(self, recompute: set[fx.Node]) -> tuple[int, int]:
        """``(peak, saved bytes)`` of the step when the forward values in ``recompute`` are recomputed in the
        backward and every other forward value the backward needs is saved."""
        saved = self.saved_set(recompute)
        bw_seq = self._backward_order(recompute)
        seq = [(n, False) for n in self.fw] + bw_seq
        position: dict[tuple[fx.Node, bool], int] = {key: i for i, key in enumerate(seq)}
        users: dict[tuple[fx.Node, bool], list[fx.Node]] = {}
        reader_keys: dict[tuple[fx.Node, bool], list[tuple[fx.Node, bool]]] = {}
        storage_reads: list[tuple[int, tuple[fx.Node, bool]]] = []
        read_keys: list[list[tuple[fx.Node, bool]]] = []  # by position: the values each one reads
        for i, (n, again) in enumerate(seq):
            keys: list[tuple[fx.Node, bool]] = []
            read_keys.append(keys)
            for a in self.reads[n]:
                src = self._source(a, n, again, recompute)
                if src is None:
                    continue
                keys.append(src)
                users.setdefault(src, []).append(n)
                reader_keys.setdefault(src, []).append((n, again))
                # the storage read: a view's base, in the copy the reader sees (a recomputed view of a saved base
                # reads the saved base)
                owner = self._source(self.owner[a], n, again, recompute)
                if owner is not None:
                    storage_reads.append((i, owner))
        # which values get a buffer (inductor's store-or-inline choice, made in order)
        fusion = _Fusion(self.addmm, self._fuses_memo)
        stored: set[tuple[fx.Node, bool]] = set()
        # the loads of the gradient sums, and of the stored values that may be written in place
        sum_loads: dict[tuple[fx.Node, bool], list[Any]] = {}
        loads: dict[tuple[fx.Node, bool], list[Any]] = {}
        for key in seq:
            n, again = key
            kept = (n in saved and not again) or n in self.bw_outputs or n in self.fw_outputs
            inputs = [self._source(a, n, again, recompute) or a for a in self.reads[n]]
            uses = (  # only a pointwise value's store-or-inline choice reads it
                _uses(reader_keys.get(key, ()), lambda k: self.kind[k[0]], lambda k: reader_keys.get(k, ()))
                if self.kind[n] == "pointwise"
                else None
            )
            if self._materialized(key, users.get(key, ()), kept, fusion, inputs, uses):
                stored.add(key)
                if self.fused and n in self.bw_outputs and _gradient_sum(n, self.kind[n]):
                    sum_loads[key] = [x for k in inputs for x in fusion.load(k)[0]]
                if self.fused and _inplace_candidate(n, self.kind[n], self.addmm):
                    loads[key] = [x for k in inputs for x in fusion.load(k)[0]]
        # where each value's reads happen: an inlined value (or a view) reads inside the kernels that read it
        run = _run_positions(seq, stored, lambda key: reader_keys.get(key, ()), lambda key: position[key])
        # last use of each storage owner over the whole sequence; recomputed copies are distinct values
        last: dict[tuple[fx.Node, bool], int] = {}
        for i, owner in storage_reads:
            last[owner] = max(last.get(owner, -1), run[i])
        for n in self.fw_outputs:
            if (n, False) in position:
                last[(self.owner[n], False)] = len(seq)
        for n in self.bw_outputs:
            if (n, False) in position:
                last[(self.owner[n], False)] = len(seq)
        later = self._gradient_sums_last(sum_loads, position, recompute)
        for b, at in later.items():
            if isinstance(b, tuple):
                last[b] = max(last.get(b, -1), at)
        live = 0
        peak = 0
        frees: dict[int, int] = {}
        if self.copies:
            copy_last = {p: -1 for p in self.copies}
            for i, (n, _) in enumerate(seq):
                for a in self.reads[n]:
                    if a in copy_last:
                        copy_last[a] = max(copy_last[a], run[i])
            for p, size in self.copies.items():
                live += size
                end = len(seq) if p in self.fw_outputs else copy_last[p]
                frees[end] = frees.get(end, 0) + size
            live -= frees.pop(-1, 0)
        # the backward's inputs besides saved values: the gradients of what the forward returns, live from the
        # backward's start to their last reader
        adds: dict[int, int] = {}
        tangent_last: dict[fx.Node, int] = {}
        for i, (n, _) in enumerate(seq):
            for a in self.reads[n]:
                if a in self.tangents:
                    tangent_last[a] = max(tangent_last.get(a, -1), run[i])
        for t in tangent_last:
            tangent_last[t] = max(tangent_last[t], later.get(t, -1))
        for t, end in tangent_last.items():
            size = _nbytes(t.meta.get("val"))
            adds[len(self.fw)] = adds.get(len(self.fw), 0) + size
            frees[end] = frees.get(end, 0) + size
        # the kernels values are computed in: a kernel's buffers are allocated when it starts, live until it ends
        kernels = self._kernels(seq, stored, lambda key: read_keys[position[key]])
        ends = {key: max(last.get(key, position[key]), kernels[key][1]) for key in stored}
        taken = self._inplace(
            [key for key in seq if key in loads], loads, stored, kernels, position, reader_keys, recompute
        )
        for v, b in taken.items():  # one storage for a chain: it lives until its last value's end
            root = b
            while root in taken:
                root = taken[root]
            ends[root] = max(ends[root], ends[v])
        starts: dict[int, list[tuple[fx.Node, bool]]] = {}
        for key in stored:
            if key not in taken:
                starts.setdefault(kernels[key][0], []).append(key)
        for i, key in enumerate(seq):
            live += adds.pop(i, 0)
            for v in starts.pop(i, ()):
                size = self.bytes[v[0]]
                live += size
                frees[ends[v]] = frees.get(ends[v], 0) + size
            peak = max(peak, live + self.scratch.get(key[0], 0))
            live -= frees.pop(i, 0)
        return peak, sum(self.bytes[n] for n in saved)

    def _gradient_sums_last(
        self,
        sum_loads: dict[tuple[fx.Node, bool], list[Any]],
        position: dict[tuple[fx.Node, bool], int],
        recompute: set[fx.Node],
    ) -> dict[Any, int]:
        """Where the buffers the gradient sums read are read last when inductor runs them together
        (:func:`~memfit.remat.compiled.fusion._gradient_sum_groups`): the storage (a value's copy, or an input) ->
        the position of the last sum of its group."""
        if len(sum_loads) < 2:
            return {}

        def is_key(x: Any) -> bool:
            return isinstance(x, fx.Node) or (
                isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], fx.Node) and isinstance(x[1], bool)
            )

        def buffers(key: tuple[fx.Node, bool]) -> set[Any]:
            found: set[Any] = set()
            for x in _flat_loads(sum_loads[key], is_key):
                if isinstance(x, fx.Node):
                    found.add(x)  # an input
                else:
                    base = self.owner[x[0]]
                    found.add((base, x[1] and base in recompute))
            return found

        sums = sorted(sum_loads, key=position.__getitem__)
        read = {key: buffers(key) for key in sums}
        later: dict[Any, int] = {}
        for group in _gradient_sum_groups(sums, read.__getitem__, lambda key: _loops(key[0])):
            at = max(position[key] for key in group)
            for key in group:
                for b in read[key]:
                    later[b] = max(later.get(b, -1), at)
        return later

    def _inplace(
        self,
        values: list[tuple[fx.Node, bool]],
        loads: dict[tuple[fx.Node, bool], list[Any]],
        stored: set[tuple[fx.Node, bool]],
        kernels: dict[tuple[fx.Node, bool], tuple[int, int]],
        position: dict[tuple[fx.Node, bool], int],
        reader_keys: dict[tuple[fx.Node, bool], list[tuple[fx.Node, bool]]],
        recompute: set[fx.Node],
    ) -> dict[tuple[fx.Node, bool], tuple[fx.Node, bool]]:
        """:func:`~memfit.remat.compiled.fusion._inplace` over the simulated sequence (a value and its recomputed
        copy are values of their own; what the step returns is never overwritten)."""
        if not values:
            return {}
        outputs = self.fw_outputs | self.bw_outputs

        def storage(x: Any) -> tuple[fx.Node, bool] | None:
            if not (isinstance(x, tuple) and isinstance(x[0], fx.Node)):
                return None  # a load at other indices
            n, again = x
            base = _reshaped_base(n, self.kind)
            if base is None:
                return None
            key = (base, again and base in recompute)
            return key if key in position else None

        return _inplace(
            values,
            loads.__getitem__,
            storage,
            lambda v: kernels[v][0] if v in kernels else -1,
            position.__getitem__,
            lambda b: reader_keys.get(b, ()),
            lambda r: r in stored or self.kind[r[0]] not in ("pointwise", "view"),
            lambda b: b in stored and b[0] not in outputs and _name(b[0]) != "cat",
            lambda b: b[0].meta.get("val"),
        )

    def _kernels(
        self,
        seq: list[tuple[fx.Node, bool]],
        stored: set[tuple[fx.Node, bool]],
        inputs: Callable[[tuple[fx.Node, bool]], Iterable[tuple[fx.Node, bool]]],
    ) -> dict[tuple[fx.Node, bool], tuple[int, int]]:
        """:func:`~memfit.remat.compiled.fusion._kernels` over the simulated sequence: each stored value's kernel
        as ``(first, last)`` positions in ``seq``; the backward starts a stretch of its own."""
        if not self.fused:
            return {key: (i, i) for i, key in enumerate(seq) if key in stored}
        first_bw = seq[len(self.fw)] if len(self.fw) < len(seq) else None
        ends = self._ends_stretch

        def ends_stretch(key: tuple[fx.Node, bool]) -> bool:
            return ends[key[0]] or key is first_bw

        return _kernels(seq, inputs, stored, ends_stretch)

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
    outputs = [a for a in pytree.tree_leaves(fw_out.args[0]) if isinstance(a, fx.Node)]
    saved = outputs[num_fwd_outputs:]
    # inductor's channels-last copies of the forward's inputs: made at its start, saved in the inputs' place
    copies = _layout_copies(fw_nodes) if fused else {}
    channels_last = fused and _layout_opt(fw_nodes)
    # each saved storage is carried once, by the first saved value that holds it
    carried: dict[str, int] = {}
    seen: set[fx.Node] = set()
    for a in saved:
        root = fw_owner[a]
        if root in seen:
            size = 0
        elif root.op == "placeholder":
            size = copies.get(root, 0)  # a parameter or input exists anyway; its layout copy does not
        else:
            size = _nbytes(root.meta.get("val"))
        seen.add(root)
        carried[a.name] = size
    fw_peak, _ = _run_peak(
        # what the forward returns (the loss, logits, a cache) lives to its end as well as what it saves
        fw_nodes,
        fw_kind,
        fw_owner,
        keep=set(outputs),
        carry=copies,
        fused=fused,
        channels_last=channels_last,
    )
    bw_nodes = [n for n in bw_gm.graph.nodes if n.op != "output"]
    bw_kind = {n: _kind(n) for n in bw_nodes}
    bw_out = next(n for n in bw_gm.graph.nodes if n.op == "output")
    grads = {a for a in pytree.tree_leaves(bw_out.args[0]) if isinstance(a, fx.Node)}
    # the backward's other inputs are the gradients of what the forward returned (a logits' gradient from the
    # next graph's backward, zeros for an unused cache), live until their last reader
    carry = {
        n: carried[n.name] if n.name in carried else _nbytes(n.meta.get("val"))
        for n in bw_nodes
        if n.op == "placeholder"
    }
    bw_peak, _ = _run_peak(
        bw_nodes,
        bw_kind,
        _owners(bw_nodes, bw_kind),
        keep=grads,
        carry=carry,
        fused=fused,
        channels_last=channels_last,
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
    channels_last: bool = False,
) -> tuple[int, int]:
    """``(peak, live at the end)`` of one graph run in order: ``carry`` are inputs that occupy memory until their
    last use (to the end if kept), ``keep`` values that live to the end (outputs). With ``fused``, a oneDNN
    convolution's call holds its scratch (:func:`~memfit.remat.compiled.fusion._call_scratch`; ``channels_last``:
    the forward's layout optimisation made its activations so), the values one kernel computes are allocated
    when it starts and live until it ends (:func:`~memfit.remat.compiled.fusion._kernels`), and a value written
    into the buffer of one its kernel computes allocates nothing (:func:`~memfit.remat.compiled.fusion._inplace`),
    and the gradient sums inductor fuses run where the last of them runs
    (:func:`~memfit.remat.compiled.fusion._gradient_sum_groups`)."""
    reads, fused_mm = _reads_after_fusion(nodes, fused)
    addmm = set(fused_mm.values())
    # which values get a buffer: inductor's store-or-inline choice, made in order
    stored: dict[fx.Node, int] = {}
    fusion = _Fusion(addmm)
    for n in nodes:
        k = kind[n]
        if k == "view":
            fusion.inline(n, n.all_input_nodes, n)
        # a matmul fused into its add runs, and writes, there
        size = (
            _nbytes(n.meta.get("val")) if n.op != "placeholder" and k != "view" and n not in fused_mm else 0
        )
        if size > 0 and (
            not fused
            or k in ("extern", "other", "getitem")
            or n in addmm
            or fusion.stored(
                n,
                n,
                reads[n],
                list(n.users),
                n in keep,
                _uses(list(n.users), lambda u: kind.get(u, "other"), _fx_users),
            )
        ):
            stored[n] = size
    index = {n: i for i, n in enumerate(nodes)}
    # an inlined value (or a view) reads its inputs where the kernels that read it run
    run = _run_positions(nodes, stored, lambda n: [u for u in n.users if u in index], index.__getitem__)
    last: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in reads[n]:
            last[owner[a]] = max(last.get(owner[a], -1), run[i])
    for n in keep:  # an output that is a view (a transposed weight gradient) keeps its base
        last[owner[n]] = len(nodes)
    if fused:  # the gradient sums inductor runs together, where the last of them runs: what they read lives until then

        def buffers(v: fx.Node) -> set[fx.Node]:
            loads = [x for a in reads[v] for x in fusion.load(a)[0]]
            return {owner[x] for x in _flat_loads(loads, lambda x: isinstance(x, fx.Node))}

        sums = [n for n in nodes if n in stored and n in keep and _gradient_sum(n, kind[n])]
        read = {v: buffers(v) for v in sums}
        for group in _gradient_sum_groups(sums, read.__getitem__, _loops):
            at = max(index[v] for v in group)
            for v in group:
                for b in read[v]:
                    last[b] = max(last.get(b, -1), at)
    matmuls = set(fused_mm) | addmm
    kernels = (
        _kernels(
            nodes, lambda n: n.all_input_nodes, stored, lambda n: n in matmuls or _ends_stretch(n, kind[n])
        )
        if fused
        else {n: (index[n], index[n]) for n in stored}
    )
    end = {v: max(last.get(v, index[v]), kernels[v][1]) for v in stored}
    end.update({p: len(nodes) if p in keep else last.get(owner[p], -1) for p in carry})
    taken = (
        _inplace(
            [v for v in stored if _inplace_candidate(v, kind[v], addmm)],
            lambda v: [x for a in reads[v] for x in fusion.load(a)[0]],
            lambda x: _reshaped_base(x, kind) if isinstance(x, fx.Node) else None,
            lambda v: kernels[v][0] if v in kernels else -1,
            index.__getitem__,
            lambda x: [u for u in x.users if u in index],
            lambda r: r in stored or kind[r] not in ("pointwise", "view"),
            lambda b: b not in keep and b in stored and _name(b) != "cat",
            lambda b: b.meta.get("val"),
        )
        if fused
        else {}
    )
    for v, b in taken.items():  # one storage for a chain: it lives until its last value's end
        root = b
        while root in taken:
            root = taken[root]
        end[root] = max(end[root], end[v])
    starts: dict[int, list[fx.Node]] = {}
    for n in stored:
        if n not in taken:
            starts.setdefault(kernels[n][0], []).append(n)
    frees: dict[int, int] = {}
    live = 0
    for p, size in carry.items():
        live += size
        frees[end[p]] = frees.get(end[p], 0) + size
    live -= frees.pop(-1, 0)
    peak = live
    for i, n in enumerate(nodes):
        for v in starts.pop(i, ()):
            live += stored[v]
            frees[end[v]] = frees.get(end[v], 0) + stored[v]
        scratch = _call_scratch(n, channels_last and _is_4d(n)) if fused else 0
        if scratch:  # the call holds its outputs too (a multi-output op's are counted at its getitems, next)
            scratch += _pieces_bytes(n)
        peak = max(peak, live + scratch)
        live -= frees.pop(i, 0)
    return peak, live + sum(frees.values())


def _gradient_sum(n: fx.Node, kind: str) -> bool:
    """A sum :func:`~memfit.remat.compiled.fusion._gradient_sum_groups` may fuse (the caller checks that only the
    graph reads it)."""
    return kind == "other" and _name(n) == "sum"


def _inplace_candidate(n: fx.Node, kind: str, addmm: Container[fx.Node]) -> bool:
    """Whether inductor may write ``n`` into the buffer of a value it reads: a pointwise kernel's value, not an
    ``addmm``'s add (an extern kernel) nor an indexing op (it reads at other indices)."""
    return kind == "pointwise" and n not in addmm and _name(n) not in _INDEXING


def _reshaped_base(x: fx.Node, kind: dict[fx.Node, str]) -> fx.Node | None:
    """The value a load of ``x`` reads at ``x``'s own index: ``x``, or through views that only reshape, their base;
    ``None`` through any other view."""
    while kind.get(x) == "view":
        if _name(x) not in _RESHAPE or not x.all_input_nodes:
            return None
        x = x.all_input_nodes[0]
    return x


def _run_positions(
    seq: Sequence[Any],
    stored: Container[Any],
    readers: Callable[[Any], Iterable[Any]],
    position: Callable[[Any], int],
) -> list[int]:
    """For each position of ``seq``, where the value there is really computed: a stored value (a buffer) at its
    own position, an inlined value or a view inside the kernels of the values that read it (the latest of them),
    so that what it reads lives until then. ``readers(item)``: the items that read ``item``; ``position(item)``:
    its index in ``seq``. (inductor's lowering inlines a pointwise value into each reader's loops; the model
    freed its inputs at its own place in the graph, and read Llama's and ViT's recompute-heavy backwards 11-15%
    under inductor's plan.)"""
    run = list(range(len(seq)))
    for i in range(len(seq) - 1, -1, -1):
        item = seq[i]
        if item in stored:
            continue
        later = [run[position(r)] for r in readers(item)]
        run[i] = max([i, *later])
    return run


def _fx_users(n: fx.Node) -> list[fx.Node]:
    return list(n.users)


def _pieces_bytes(n: fx.Node) -> int:
    """Bytes of the outputs of a multi-output op that the graph reads (its getitems); 0 for a single output."""
    if isinstance(n.meta.get("val"), torch.Tensor):
        return 0
    return sum(_nbytes(u.meta.get("val")) for u in n.users if u.target is operator.getitem)


def _is_4d(conv: fx.Node) -> bool:
    """Whether a convolution (or its backward) is over 2 spatial dimensions: its output (its input gradient) is
    4-d."""
    val = conv.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = next((v for v in val if v is not None), None)
    return isinstance(val, torch.Tensor) and val.dim() == 4
