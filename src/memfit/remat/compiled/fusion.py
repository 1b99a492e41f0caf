"""inductor's fusion as memfit's model sees it: which values of an fx graph get a buffer of their own.

A value's kind and storage (views and the value they alias, pieces of multi-output ops), the ops inductor runs as
extern kernels, the ``addmm`` fusion of its post-grad pass (:func:`_addmm_fusions`), and :class:`_Fusion`, its
store-or-inline choice for each pointwise value. :mod:`memfit.remat.compiled.model` builds the step's memory on
these.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx

from memfit import _compat
from memfit.remat.eager.capture import _alias_arg

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


# Tensor factories inductor lowers to a constant or index expression of its loops (``tensor_constructor``,
# ``iota``): computed inside each kernel that reads them, as a pointwise value that reads no buffer is. An
# embedding's gradient, ``index_put(full(0), ...)``, is then one buffer (inductor clones the inlined zeros into the
# buffer it scatters into), not two.
_CONSTANT = frozenset({"full", "zeros", "ones", "scalar_tensor", "iota", "arange"})


# Indexing ops inductor lowers to a pointwise loop with an indirect (or range-selected) load (``lowering.py``:
# ``embedding``, ``index``, ``gather``, ``constant_pad_nd``, ``slice_scatter``, ``select_scatter``, ``index_select``;
# its random ops ``inductor_random``/``inductor_lookup_seed``): inlined into their readers like any pointwise value,
# not buffers of their own. Mixtral's ``batched_mm`` experts gather a weight per token (256 x 512 x 128 floats at
# 2 x 64 tokens): inductor never stores it.
_INDEXING = frozenset(
    {
        "embedding", "index", "_unsafe_index", "gather", "index_select", "constant_pad_nd", "slice_scatter",
        "select_scatter", "inductor_random", "inductor_lookup_seed",
    }
)  # fmt: skip


# Views that keep a value's element order (inductor's index into the same buffer is the same expression): a load
# through one of them is the load of the value itself. Any other view (a slice, a transpose, a split's piece) reads
# the value at other indices: inductor counts each such load apart.
_RESHAPE = frozenset(
    {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "alias", "expand", "flatten"}
)


# Ops inductor lowers to a scatter into a buffer (a mutation: ``ir.Scatter``): a kernel of their own, which the
# scheduler does not fuse with the work around it. Mixtral's ``batched_mm`` experts accumulate each layer's expert
# weight gradient (2 MiB here) by ``index_put``: joined to its stretch, the model allocated it 80 ops early (1.18x
# inductor's plan at the least-memory point).
_SCATTER = frozenset(
    {"index_put", "_unsafe_index_put", "scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy",
     "index_reduce", "_unsafe_masked_index_put_accumulate"}
)  # fmt: skip


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
        return "other" if _dot_bmm(node) else "extern"
    if _name(node) in _INDEXING or (_name(node) in _CONSTANT and not node.all_input_nodes):
        return "pointwise"
    tags = getattr(node.target, "tags", ())
    if torch.Tag.pointwise in tags:
        return "pointwise"
    if _is_view(node):
        return "view"
    return "other"


def _dot_bmm(node: fx.Node) -> bool:
    """A CPU ``bmm`` with one row or one column per batch (``(B, 1, K) @ (B, K, N)`` or ``(B, M, K) @ (B, K, 1)``):
    inductor lowers it as a multiply and a sum over K (``kernel/bmm.py``, ``tuned_bmm``: "decompose to small ops
    when memory bound"), a reduction that loads its inputs inside its own loops, not an extern kernel."""
    if _name(node) != "bmm" or len(node.args) < 2 or node.kwargs.get("out_dtype") is not None:
        return False
    a, b = (x.meta.get("val") if isinstance(x, fx.Node) else None for x in node.args[:2])
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != 3 or b.dim() != 3:
        return False
    return (
        a.device.type == "cpu"
        and b.device.type == "cpu"
        and (_hint(a.shape[1]) == 1 or _hint(b.shape[2]) == 1)
    )


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


_CONV = "convolution"


def _is_conv2d(node: fx.Node) -> bool:
    """An ``aten.convolution`` over 2 spatial dimensions (4-d input and weight)."""
    if node.op != "call_function" or _name(node) != _CONV or len(node.args) < 2:
        return False
    w = node.args[1]
    val = w.meta.get("val") if isinstance(w, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 4


def _onednn(node: fx.Node) -> bool:
    """Whether inductor runs ``node``'s convolutions through oneDNN: a CPU graph, oneDNN built and enabled."""
    mkldnn = torch.backends.mkldnn
    return _device_type(node) == "cpu" and bool(mkldnn.is_available() and mkldnn.enabled)


def _layout_opt(nodes: Iterable[fx.Node]) -> bool:
    """Whether inductor turns on its layout optimisation for a graph of ``nodes``
    (``GraphLowering.decide_layout_opt``, torch/_inductor/graph.py, training graphs, default config): a graph with
    a convolution, on a CPU with oneDNN always; on other devices unless its convolutions are few for its size, grouped
    with more than one input channel, or narrower out than in (``is_in_out_channel``); never when inductor's
    ``layout_optimization`` is off, always when ``force_layout_optimization`` is on."""
    enabled, forced = _compat.inductor_layout_optimization()
    if not enabled:
        return False  # turned off (memfit's refining compile does, when the copies keep a plan over budget)
    if forced:
        return True
    nodes = list(nodes)
    convs = [n for n in nodes if n.op == "call_function" and _name(n) == _CONV and len(n.args) >= 2]
    if not convs:
        return False
    if all(_onednn(n) for n in convs):
        return True
    if len(nodes) >= 300 * len(convs):
        return False
    for n in convs:
        w = n.args[1].meta.get("val") if isinstance(n.args[1], fx.Node) else None
        if not isinstance(w, torch.Tensor) or w.dim() < 3:
            continue
        groups = n.args[-1] if isinstance(n.args[-1], int) else 1
        if (groups > 1 and w.size(1) > 1) or (w.size(0) * 2 <= w.size(1) and w.size(2) > 1):
            return False
    return True


def _layout_copies(nodes: Iterable[fx.Node]) -> dict[fx.Node, int]:
    """``{graph input: bytes}`` of the channels-last copies inductor's layout optimisation makes of a graph's inputs:
    a 2-d convolution requires its input and weight channels-last (``kernel/conv.py``, ``convolution``:
    ``require_channels_last``), and an input of the graph (a parameter, the batch) that is not already so is
    copied. The forward returns the copy in the input's place when it saves it for the backward (a convolution's
    weight and input are saved for its backward), so the copy lives until its last use there (ResNet-18 at 64x64:
    42 MiB of weight copies, as much again as the saved activations of a batch of 8)."""
    nodes = list(nodes)
    if not _layout_opt(nodes):
        return {}
    out: dict[fx.Node, int] = {}
    for n in nodes:
        if not _is_conv2d(n):
            continue
        for a in n.args[:2]:
            val = a.meta.get("val") if isinstance(a, fx.Node) else None
            if (
                isinstance(a, fx.Node)
                and a.op == "placeholder"
                and isinstance(val, torch.Tensor)
                and val.dim() == 4
                and not val.is_contiguous(memory_format=torch.channels_last)
            ):
                out[a] = _nbytes(val)
    return out


def _call_scratch(node: fx.Node, channels_last: bool) -> int:
    """Bytes a oneDNN convolution holds inside its call beyond its inputs and outputs, as inductor's buffer plan
    counts them (``memfit._compat.inductor_wrapper_plan``, ``onednn_scratch``, measured by RSS on torch 2.13's CPU
    build): a forward convolution holds its weight in oneDNN's blocked format, plus its output in that format when
    the input is not channels-last; ``convolution_backward`` holds twice the weight with channels-last inputs, and
    the weight and the output gradient otherwise. ``channels_last``: the convolution's activations are (the layout
    optimisation of the forward, :func:`_layout_opt`, on a 2-d convolution). 0 for other ops and devices."""
    name = _name(node)
    if name not in (_CONV, "convolution_backward") or not _onednn(node) or len(node.args) < 3:
        return 0
    if name == _CONV:
        weight = node.args[1]
        w = _nbytes(weight.meta.get("val")) if isinstance(weight, fx.Node) else 0
        return w + (0 if channels_last else _nbytes(node.meta.get("val")))
    grad_out, weight = node.args[0], node.args[2]
    w = _nbytes(weight.meta.get("val")) if isinstance(weight, fx.Node) else 0
    if channels_last:
        return 2 * w
    return w + (_nbytes(grad_out.meta.get("val")) if isinstance(grad_out, fx.Node) else 0)


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
    (``ir.StorageBox.should_realize_on_reuse``): on CPU, one with a transcendental op, or one that reads more than
    ``realize_reads_threshold`` (4) buffers. inductor counts the distinct loads of its loop IR (a buffer read at two
    indices is two loads); memfit counts the distinct fx values the fused expression reads (a view of a buffer is a
    value of its own, so two differently indexed reads of one buffer count twice there too), against the same 4.
    memfit also counts ``erf`` as transcendental, which inductor's list does not: on ViT's recomputed GELU
    (``erf(x) + 1`` read by two ops in the backward), inductor's plan holds a buffer of that size, and without
    ``erf`` the model fell 4% to 17% below it (reason not traced further). An earlier version counted against 2;
    that threshold had absorbed values the model missed elsewhere (what the forward returns, the backward's
    tangents, inlined constants): with those modelled, inductor's 4 matches its plans on the zoo
    (``benchmarks/remat_compiled_model_gap.py``), where 2 put GPT-2's loss graph at twice inductor's plan.
    Reductions' results are buffers. Values are fed in order, so every input's expression is known when a value is
    decided.
    """

    _READS_ON_REUSE = 4  # torch/_inductor/config.py realize_reads_threshold
    _HEAVY_CPU = frozenset({"exp", "log", "log10", "log1p", "log2", "sigmoid", "tanh"})

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

    def inline(self, key: Any, inputs: Iterable[Any], node: fx.Node | None = None) -> None:
        """``key`` (a view, ``node``) reads as its input does, at other indices unless the view only reshapes."""
        for k in inputs:
            if k in self._expr:
                loads, heavy = self._expr[k]
                if node is not None and _name(node) not in _RESHAPE:
                    loads = frozenset((x, key) for x in loads)
                self._expr[key] = (loads, heavy)
            return

    def stored(
        self,
        key: Any,
        node: fx.Node,
        inputs: Iterable[Any],
        users: Iterable[fx.Node],
        kept: bool,
        uses: int | None = None,
    ) -> bool:
        """Whether pointwise ``node`` (the value ``key``, reading the values ``inputs``) gets a buffer of its own.
        ``uses``: how many reads the value has counting those through its views (:func:`_uses`); by default its
        readers ``users``."""
        reads: set[Any] = set()
        cpu = _device_type(node) == "cpu"
        heavy = cpu and _name(node) in self._HEAVY_CPU
        # an indexing op (a slice_scatter, a pad, a gather) loads its inputs at indices of its own: inductor counts
        # those loads apart from loads of the same buffers elsewhere in the expression
        reindex = _name(node) in _INDEXING
        for k in inputs:
            r, h = self.load(k)
            reads |= frozenset((x, key) for x in r) if reindex else r
            heavy = heavy or h
        users = set(users)  # an op reading the value twice is one reader
        reused = (len(users) if uses is None else uses) > 1
        store = (
            kept
            or not self.rules.lowered(node.target)
            or any(not self._fuses_inputs(u) for u in users)
            or len(reads) > self.rules.acc_reads["cpu" if cpu else "other"]
            or (reused and (heavy or len(reads) > self._READS_ON_REUSE))
            # GraphLowering.run_node: a value several ops read, one of them in needs_realized_inputs (a bmm, even the
            # one-row bmm inductor turns into a multiply and a sum), gets realize_hint: stored when its expression
            # loads more than one buffer (Mixtral's per-token weight gather, read by two bmm in the backward)
            or (reused and len(reads) > 1 and any(_dot_bmm(u) for u in users))
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
        if _dot_bmm(user):  # a multiply and a sum, though bmm is in needs_realized_inputs
            return True
        if kind == "view":
            return all(self._fuses_inputs(u) for u in user.users)
        return kind == "pointwise" or self.rules.lowered(user.target)


def _kernels(
    items: Sequence[Any],
    inputs: Callable[[Any], Iterable[Any]],
    stored: Iterable[Any],
    ends_stretch: Callable[[Any], bool],
) -> dict[Any, tuple[int, int]]:
    """Each stored value's kernel, as ``(first, last)``: the positions in ``items`` (values run in order: fx nodes,
    or a model's keys) of the first and the last stored value that inductor computes in the same kernel.
    ``inputs`` gives the values an item reads; ``ends_stretch`` the items that are no part of a fused kernel
    (:func:`_ends_stretch`, and the caller's own: matmuls fused into their adds, the backward's start).

    Between two extern kernels (a matmul, a convolution, a fallback op inductor has no lowering for, the pieces of a
    multi-output op), inductor's scheduler fuses pointwise work with the work that reads it into one kernel, which
    runs where its earliest member was: the buffers of all its members are allocated before it runs and those only
    it reads are freed after it (``Scheduler.fuse_nodes``; the fused node's ``min_order``). memfit takes the values
    joined by reads (through inlined values and views) within such a stretch as one kernel. HF Mamba's
    pure-PyTorch scan (a dozen concatenations of 0.03-1 MiB per layer, each read by the next) is one kernel, all its
    buffers live at once: the model read 0.63-0.66 of inductor's plan when it freed each as its last reader passed.
    Work that shares only an input stays apart, and reading through an extern kernel is not fusion: inductor's
    horizontal fusion (but for the gradient sums of :func:`_gradient_sum_groups`), its pulling of kernels ahead of
    extern ones and its reordering for peak memory are not modelled (fusing values of equal size that share a read,
    within 64 kernels, put the model 5-44% over inductor's plans on BERT, GPT-NeoX, ViT and memfit's GPT, where
    inductor's peak-memory checks keep them apart)."""
    index = {item: i for i, item in enumerate(items)}

    stretch: dict[Any, int] = {}
    current = 0
    for item in items:
        if ends_stretch(item):
            current += 1
            continue
        stretch[item] = current
    parent: dict[Any, Any] = {}

    def root(x: Any) -> Any:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    for item in items:
        if item not in stretch:
            continue
        for a in inputs(item):
            if stretch.get(a) == stretch[item]:
                ra, rn = root(a), root(item)
                if ra != rn:
                    parent[ra] = rn
    stored = set(stored)
    span: dict[Any, tuple[int, int]] = {}
    for item in items:
        if item in stored and item in stretch:
            r = root(item)
            first, last = span.get(r, (index[item], index[item]))
            span[r] = (min(first, index[item]), max(last, index[item]))
    return {v: span[root(v)] if v in stretch else (index[v], index[v]) for v in stored}


def _ends_stretch(n: fx.Node, kind: str) -> bool:
    """Whether inductor runs ``n`` outside any fused kernel (an input, an extern kernel, a fallback op it has no
    lowering for, a multi-output op's pieces, a scatter), which ends a stretch of :func:`_kernels`."""
    if kind in ("input", "extern", "getitem") or _name(n) in _SCATTER:
        return True
    # a one-row bmm is a multiply and a sum (:func:`_dot_bmm`), fused like any reduction
    return kind == "other" and not (
        _dot_bmm(n) or (n.op == "call_function" and _compat.inductor_inline_rules().lowered(n.target))
    )


def _uses(
    readers: Sequence[Any], kind: Callable[[Any], str], readers_of: Callable[[Any], Sequence[Any]]
) -> int:
    """How many times a value is read, as inductor counts it for reuse: a reader counts once, a view by its own
    reads (``GraphLowering.run_node`` calls ``mark_reuse(len(node.users))`` on each node's result, and a view passes
    it to the value it views: HF Mamba's scan reads ``exp(...)`` once, through a permute that three slices read,
    and inductor stores it)."""
    return sum(_uses(readers_of(r), kind, readers_of) if kind(r) == "view" else 1 for r in readers)


def _device_type(node: fx.Node) -> str:
    val = node.meta.get("val")
    return val.device.type if isinstance(val, torch.Tensor) else "cpu"


def _gradient_sum_groups(
    sums: Sequence[Any],
    buffers: Callable[[Any], set[Any]],
    loops: Callable[[Any], Any],
    window: int = 64,
) -> list[list[Any]]:
    """inductor's horizontal fusion of the sums whose results only the graph returns (a norm's weight and bias
    gradients, a bias gradient: sums over the batch and positions), as groups of ``sums`` (in run order) that run
    as one kernel, where the last of them runs; only groups of two or more are returned.

    Nothing reads such a sum, and its loops (over the features, reducing the batch) are not those of the work
    around it (over the positions), so inductor's scheduler fuses it with no neighbour vertically; it fuses it
    horizontally with another reduction of the same loops that reads a buffer it reads (``score_fusion_memory``),
    and the fused kernel runs after the inputs of all its members are ready, so the buffers the earlier sums read
    live until then. Here a sum joins the latest group, among the last ``window`` (inductor tries the pairs of 64
    nodes that share a buffer, ``max_fusion_buffer_group_pairwise_attempts``), whose sums have the same loops
    (``loops``) and read a buffer it reads (``buffers``: the storage its fused loop loads).

    Measured on HF ViT's least-memory backward (``benchmarks/remat_compiled_model_gap.py``): inductor ran the first
    layer norm's weight and bias gradients of one layer with the second's of the layer below, after the MLP between
    them (both recompute their input from one residual stream), keeping the attention's input gradients (3 x 0.25
    MiB) through it: with this rule memfit's model went from 0.866 to 0.99 of inductor's plan; the other zoo graphs
    are unchanged, their gradient sums read no buffer in common."""
    groups: list[tuple[list[Any], set[Any], Any]] = []
    for s in sums:
        key, reads = loops(s), buffers(s)
        for members, seen, k in reversed(groups[-window:]):
            if k == key and seen & reads:
                members.append(s)
                seen |= reads
                break
        else:
            groups.append(([s], set(reads), key))
    return [members for members, _, _ in groups if len(members) > 1]


def _loops(node: fx.Node) -> tuple[Any, ...]:
    """A reduction's loops as :func:`_gradient_sum_groups` compares them: its result's shape and its input's size."""
    val = node.meta.get("val")
    first = node.all_input_nodes[0].meta.get("val") if node.all_input_nodes else None
    shape = tuple(_hint(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()
    return shape, _hint(first.numel()) if isinstance(first, torch.Tensor) else None


def _flat_loads(loads: Iterable[Any], leaf: Callable[[Any], bool]) -> list[Any]:
    """The values in :meth:`_Fusion.load` results (a load at other indices is a tuple of the value and its
    reader): the items for which ``leaf`` holds."""
    found: list[Any] = []
    stack = list(loads)
    while stack:
        x = stack.pop()
        if leaf(x):
            found.append(x)
        elif isinstance(x, tuple):
            stack.extend(x)
    return found


def _inplace(
    values: Sequence[Any],
    loads: Callable[[Any], Iterable[Any]],
    storage: Callable[[Any], Any | None],
    kernel_start: Callable[[Any], int],
    position: Callable[[Any], int],
    readers: Callable[[Any], Iterable[Any]],
    in_kernel: Callable[[Any], bool],
    writable: Callable[[Any], bool],
    val: Callable[[Any], Any],
) -> dict[Any, Any]:
    """inductor's in-place reuse (``SchedulerNode.decide_inplace_update``, ``wrapper.codegen_inplace_reuse``) within
    one fused kernel: a stored pointwise value is written into the buffer of a value of the same kernel that it
    loads at the same index (same dtype, storage size and layout) and that no other kernel value reads, unless that
    buffer must survive (a graph output). The value then allocates nothing, and the buffer lives until the value's
    last reader. Returns ``{value: the value whose buffer it takes}``, in the order the values run (a value may take
    a buffer another value took before it: one storage for a chain).

    ``values``: the candidates (stored pointwise values, not an ``addmm``'s add nor an indexing op), in run order;
    ``loads(v)``: what ``v``'s fused loop loads (:meth:`_Fusion.load` of its inputs); ``storage(x)``: the value whose
    buffer a load ``x`` reads at ``v``'s index (through reshapes only), ``None`` for a load at other indices;
    ``kernel_start(b)``: where ``b``'s kernel starts (:func:`_kernels`; -1 for an input); ``readers(b)``: the
    values that read ``b`` directly; ``in_kernel(r)``: whether ``r`` is computed in a kernel (stored, or an extern
    kernel) rather than inlined into its readers; ``writable(b)``, ``val(b)``: whether ``b``'s buffer may be
    overwritten, and its example value.

    inductor also writes into the buffers of earlier kernels' values and of the backward's saved inputs when those
    are read last; the model does not, because which reads are the last ones depends on the kernels inductor fuses
    and reorders, which the model does not know: with reuse across kernels, memfit's GPT at budgets 0.8 and 0.5
    read 0.81-0.87 of inductor's plan (it wrote a GELU's gradient over its saved input, which inductor reads again
    in a kernel it fused horizontally; inductor wrote it over the incoming gradient). Within a kernel
    (``benchmarks/remat_compiled_model_gap.py``'s graphs, memfit's model against inductor's plan of the same
    graphs): Mamba at budget 0.7 1.117 -> 1.097 (its scan's backward writes most of its values over the ones they
    are computed from), with torch's partition GPT-2 1.024 -> 1.000, Llama 1.085 -> 1.042, Mamba 1.015 -> 0.996;
    Llama at 0.7 0.972 -> 0.927 (inductor also keeps freed buffers for later reuse, not modelled)."""
    memo: dict[Any, set[Any]] = {}

    def kernel_readers(x: Any) -> set[Any]:
        found = memo.get(x)
        if found is None:
            found = set()
            for r in readers(x):
                found |= {r} if in_kernel(r) else kernel_readers(r)
            memo[x] = found
        return found

    taken: set[Any] = set()
    chosen: dict[Any, Any] = {}
    for v in values:
        start = kernel_start(v)
        candidates = {b for b in (storage(x) for x in loads(v)) if b is not None}
        for b in sorted(candidates, key=position):
            if b in taken or not writable(b) or kernel_start(b) != start or not _same_index(val(b), val(v)):
                continue
            if kernel_readers(b) != {v}:
                continue
            taken.add(b)
            chosen[v] = b
            break
    return chosen


def _same_index(a: Any, b: Any) -> bool:
    """Whether a kernel writing ``b`` can write into ``a``'s buffer at the index it reads it
    (``can_match_buffer_size`` and an equal index): same dtype and bytes, and the same layout (or both
    contiguous)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.device != b.device or _nbytes(a) != _nbytes(b):
        return False
    if tuple(a.shape) == tuple(b.shape) and tuple(a.stride()) == tuple(b.stride()):
        return True
    return a.is_contiguous() and b.is_contiguous()
