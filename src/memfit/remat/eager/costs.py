"""What an op costs, in seconds: the rates of a device and the cost model that prices the ops of a captured step.

``cost="flops"`` (the default of :func:`memfit.remat.eager.capture.capture`) prices an op as its FLOPs (torch's
``flop_counter`` formulas, plus :func:`extra_flops` for the matmuls it leaves out) at a measured matmul rate
(convolutions and their backward at their own), the bytes it reads and writes at a measured bandwidth (a random op:
its draws at a measured dropout rate; an advanced-indexing gather or scatter: its indexed elements at a measured
gather rate), the fresh pages of its large CPU outputs at a measured rate, and a measured dispatch time per op. The
planner's step-time roofline (:mod:`memfit.plan`) prices with the same functions; the compiled path's model
(:mod:`memfit.remat.compiled.model`) prices its recomputed matmuls' FLOPs with :func:`op_flops` (not the gather
and fresh-page rates: inductor fuses gathers into their readers' loops and plans its own buffers).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import flop_registry

from memfit import _compat

__all__ = [
    "FRESH_PAGES_FROM",
    "Rates",
    "calibrate",
    "draws_random",
    "element_seconds",
    "extra_flops",
    "fresh_page_seconds",
    "gather_seconds",
    "gathered_elements",
    "op_flops",
    "random_seconds",
]


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    for a in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(a, fx.Node) and a not in found:
            found.append(a)
    return found


@dataclass(frozen=True)
class Rates:
    """A device's speeds, as memfit's cost models use them: an op costs its FLOPs at ``flops_per_s``, the bytes it
    reads and writes at ``bytes_per_s``, and ``op_overhead_s`` of dispatch. Convolutions run their FLOPs at
    ``conv_flops_per_s`` and their backward at ``conv_backward_flops_per_s`` where given: on a CPU neither reaches
    the matmul rate, and the backward runs slower per FLOP than the forward (ResNet-18: with one rate for all, its
    forward convolutions took 32% of the predicted step and 22% of the profiled one, the backward 61% and 67%).
    A random op draws its largest output's elements at ``random_elements_per_s`` where given, in place of the bytes
    it moves: a CPU generator draws one element in about the time 25 bytes stream (dropout 8-14 ns an element, a
    multiply 0.35-0.45 ns, one thread), so priced by its bytes a dropout read 1/20 of its time, and the
    least-memory schedules of BERT and T5, which recompute their dropouts many times, ran 17-23% over their
    predicted compute.

    An advanced-indexing gather or scatter (``aten.index.Tensor``, ``aten.index_put`` and its in-place forms) moves
    its indexed elements at ``gather_elements_per_s`` where given: index's output, index_put's values. On one
    thread of the 2-core x86_64 CPU this was written on (torch 2.13.0+cpu, 2026-12-03, outputs of 16 MiB, as the
    multiply that measures the bandwidth, 0.29-0.49 ns an element): ``index.Tensor`` of an (8, 128, 512) float32
    weight by 64 ids along dim 0 0.92 ns an element, of an (8192, 512) one by 8192 rows 1.2 ns (4-6x its bytes'
    price); ``index_put`` with ``accumulate`` of (64, 128, 512) values 0.55 ns, of (8192, 512) 1.6 ns (3-3.7x);
    ``index_select``, ``gather`` along the last dim, ``scatter``, ``scatter_add``, ``index_add`` and
    ``embedding`` 0.35-1.6 ns, within 0.7-2.4x of their bytes' price: priced by their bytes.

    A CPU output of ``FRESH_PAGES_FROM`` bytes or more costs its bytes at ``fresh_page_bytes_per_s`` on top, where
    given: glibc's allocator maps such a block anew (its dynamic mmap threshold stops at 32 MiB on 64-bit), and the
    kernel zeroes each page at its first touch. Measured as above: a multiply with a 16 MiB output 0.49 ns an
    element, with a 32-512 MiB one 2.7 ns; ``index.Tensor`` 0.89 and 3.1-3.3 ns; ``torch.empty(n).fill_`` 0.28
    and 2.4-2.8 ns; into a preallocated output (``out=``) 0.3-0.5 ns at every size. Mixtral's ``batched_mm``
    experts gather 256-512 MiB of expert weights a call, and its least-memory schedule recomputes them.

    :func:`calibrate` measures them (once per process and device). Measured on a shared machine they move by
    10-30% between processes, and the plans that depend on them can move with them: pass one ``Rates`` to every
    process (``memfit.remat.compile(..., rates=...)``, ``memfit.remat.backend(..., rates=...)``) for the same plan
    everywhere.
    """

    flops_per_s: float
    bytes_per_s: float
    op_overhead_s: float
    conv_flops_per_s: float | None = None
    conv_backward_flops_per_s: float | None = None
    random_elements_per_s: float | None = None
    gather_elements_per_s: float | None = None
    fresh_page_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        optional = (
            "conv_flops_per_s",
            "conv_backward_flops_per_s",
            "random_elements_per_s",
            "gather_elements_per_s",
            "fresh_page_bytes_per_s",
        )
        for name in ("flops_per_s", "bytes_per_s", "op_overhead_s", *optional):
            value = getattr(self, name)
            if name in optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"Rates.{name} must be a finite number, got {value!r}")
        if (
            self.flops_per_s <= 0
            or self.bytes_per_s <= 0
            or self.op_overhead_s < 0
            or any(v is not None and v <= 0 for v in (getattr(self, name) for name in optional))
        ):
            raise ValueError(
                "Rates must have flops_per_s > 0, bytes_per_s > 0, op_overhead_s >= 0 and the optional rates > 0; "
                f"got {self}"
            )


_RATES: dict[str, Rates] = {}


def calibrate(device: torch.device | str = "cpu") -> Rates:
    """Measure ``device``'s matmul FLOP rate, memory bandwidth and per-op overhead (about a second; cached for the
    process). ``"meta"`` measures this machine's CPU."""
    return _calibrate(torch.device(device))


def _calibrate(device: torch.device) -> Rates:
    """Measure matmul FLOP rate, memory bandwidth and per-op overhead of ``device`` once per process."""
    if device.type == "meta":  # planning without a device: estimate with this machine's CPU
        device = torch.device("cpu")
    key = str(device)
    if key in _RATES:
        return _RATES[key]
    # real tensors, whatever mode is active: the compiled path first calibrates inside torch.compile's partitioner,
    # under its FakeTensorMode, where a matmul takes no time (1.4e12 FLOP/s "measured" on a 2-core CPU) and every op
    # pays fake dispatch (1 ms of "overhead")
    with _compat.no_python_dispatch():
        rates = _measure(device)
    _RATES[key] = rates
    return rates


def _measure(device: torch.device) -> Rates:
    """Time a matmul, a streaming multiply, a tiny op, a dropout, a gather, a convolution (forward, backward) and,
    on a CPU, the fill of a fresh block on ``device``."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def best(fn: Callable[[], object], reps: int = 5) -> float:
        fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    n = 512 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device)
    flops = 2 * n**3 / best(lambda: a @ a)
    big = torch.empty(4 * 2**20, device=device)  # 16 MiB: beyond most caches on the devices we run on
    bandwidth = 2 * big.numel() * 4 / best(lambda: big.mul(2.0))
    # a whole dropout (draws, mask, scaling): what a random op's elements cost, its memory traffic included
    random = big.numel() / best(lambda: torch.ops.aten.native_dropout.default(big, 0.1, True), reps=3)
    # a gather of whole rows by a 1-d index (Mixtral batched_mm's experts): a 16 MiB output, as the multiply's
    weight = torch.randn(8, 128, 512, device=device)
    ids = torch.randint(0, 8, (big.numel() // (128 * 512),), device=device)
    gather = big.numel() / best(lambda: torch.ops.aten.index.Tensor(weight, [ids]))
    fresh = _fresh_pages(best, big) if device.type == "cpu" else None
    tiny = torch.empty(1, device=device)
    overhead = best(lambda: [tiny.add(1) for _ in range(100)]) / 100
    # a 3x3 convolution and its backward (ResNet's stage-1 shape, batch 4 at 32x32 on a CPU): FLOPs by torch's formulas
    c, hw = (64, 32) if device.type == "cpu" else (256, 64)
    x = torch.randn(4, c, hw, hw, device=device)
    w = torch.randn(c, c, 3, 3, device=device)
    y = torch.nn.functional.conv2d(x, w, padding=1)
    aten = torch.ops.aten

    conv_flops = (
        2 * y.numel() * c * 9
    )  # the forward's; the backward's (input and weight gradients) are twice that
    forward = best(
        lambda: aten.convolution.default(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), reps=3
    )
    backward = best(
        lambda: aten.convolution_backward.default(
            y, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
        ),
        reps=3,
    )
    rates = Rates(
        flops_per_s=flops,
        bytes_per_s=bandwidth,
        op_overhead_s=overhead,
        conv_flops_per_s=conv_flops / forward,
        conv_backward_flops_per_s=2 * conv_flops / backward,
        random_elements_per_s=random,
        gather_elements_per_s=gather,
        fresh_page_bytes_per_s=fresh,
    )
    return rates


def _fresh_pages(best: Callable[[Callable[[], object]], float], big: torch.Tensor) -> float | None:
    """Bytes a second the allocator's fresh pages cost: a fill of a new ``FRESH_PAGES_FROM``-sized block less a fill
    of one allocated before; ``None`` where the new block costs no more (an allocator that keeps such blocks)."""
    n = 2 * FRESH_PAGES_FROM // big.element_size()
    reused = torch.empty(n, dtype=big.dtype)
    fill = best(lambda: reused.fill_(1.0))
    fresh = best(lambda: torch.empty(n, dtype=big.dtype).fill_(1.0))
    if fresh < 1.2 * fill:
        return None
    return n * big.element_size() / (fresh - fill)


# the ops :func:`extra_flops` counts: the CPU flash attention kernels (forward, backward) and grouped matmuls by
# their qualified names (Hugging Face's fallback is a custom op that exists only where transformers is imported)
CPU_ATTENTION = frozenset(
    {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
    }
)
GROUPED_MATMULS = frozenset(
    {"aten::_grouped_mm", "transformers::grouped_mm_fallback", "transformers::grouped_mm_fallback_backward"}
)


def check_rates(rates: Any) -> None:
    """A clear error for ``rates`` that is neither ``None`` nor a :class:`Rates`."""
    if rates is not None and not isinstance(rates, Rates):
        raise TypeError(
            f"rates must be a memfit.remat.Rates (e.g. memfit.remat.calibrate('cpu')) or None, got {rates!r}"
        )


def extra_flops(packet: Any, args: Sequence[Any]) -> int | None:
    """FLOPs of matmul-like ops torch's flop counter does not list, ``None`` for any other op:

    - the CPU flash attention kernels (it lists the CUDA ones): its formulas restated
      (``torch.utils.flop_counter.sdpa_flop_count`` / ``sdpa_backward_flop_count``: the forward's two batched
      matmuls, the backward's five, one of them recomputing the scores), halved for a causal mask, whose blocks
      above the diagonal the CPU kernel skips. Unpriced, ViT's attention read 1/26 of its profiled time;
    - grouped matmuls (``aten._grouped_mm``; Hugging Face's ``transformers::grouped_mm_fallback``, what Mixtral's
      ``grouped_mm`` experts run on a CPU, and its backward): each row of the input multiplies one group's
      matrix, ``2 * rows * K * N``. Unpriced, Mixtral's experts read 1/24 of their profiled time.
    """
    aten = torch.ops.aten
    name = getattr(packet, "_qualified_op_name", "")
    if packet is aten._scaled_dot_product_flash_attention_for_cpu:
        q, k, v, rest = args[0], args[1], args[2], args[3:]
        matmuls_d, matmuls_dv = 1, 1  # scores = q k^T; out = p v
    elif packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:
        q, k, v, rest = args[1], args[2], args[3], args[6:]
        matmuls_d, matmuls_dv = 3, 2  # scores again, dq, dk; dp, dv
    elif name in GROUPED_MATMULS and not name.endswith("_backward"):
        a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return 0
        if a.dim() == 2 and b.dim() == 2:  # the groups split K: out (groups, M, N)
            return 2 * a.shape[0] * a.shape[1] * b.shape[1]
        rows = a.shape[0] if a.dim() == 2 else a.shape[0] * a.shape[1]
        return 2 * rows * a.shape[-1] * b.shape[-1]
    elif name in GROUPED_MATMULS:  # HF's backward: (input, weight, offs, grad) -> grad input, grad weight
        a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return 0
        return 2 * 2 * a.shape[0] * a.shape[1] * b.shape[-1]
    else:
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return 0
    b_, h, s_q, d = q.shape
    s_k, d_v = k.shape[2], v.shape[3]
    is_causal = len(rest) > 1 and rest[1] is True
    flops = 2 * b_ * h * s_q * s_k * (matmuls_d * d + matmuls_dv * d_v)
    return int(flops // 2 if is_causal else flops)


def _flops(node: fx.Node) -> int:
    """:func:`op_flops` of an fx node, by the example values it was traced with."""
    args, kwargs = pytree.tree_map_only(fx.Node, lambda a: a.meta.get("val"), (node.args, node.kwargs))
    return op_flops(node.target, args, kwargs, node.meta.get("val"))


def op_flops(target: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> int:
    """FLOPs of one call of ``target`` by torch's flop counter formulas and :func:`extra_flops` (0 where neither has
    one); a symbolic count (dynamic shapes) by its hint."""
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return 0
    extra = extra_flops(packet, args)
    if extra is not None:
        return int(extra)
    if packet not in flop_registry:
        return 0
    try:
        flops = flop_registry[packet](*args, out_val=out, **kwargs)
    except Exception:  # a formula that does not accept this overload's arguments: bytes moved only
        return 0
    if isinstance(flops, torch.SymInt):
        hint = getattr(flops.node, "hint", None)
        return int(hint) if hint is not None else 0
    return int(flops)


def random_seconds(out: Any, rates: Rates) -> float:
    """What a random op's draws cost at ``rates.random_elements_per_s``: its largest output's elements (a dropout's
    mask and output are the size of its input), memory traffic included."""
    assert rates.random_elements_per_s is not None
    leaves = pytree.tree_leaves(out)
    drawn = max((t.numel() for t in leaves if isinstance(t, torch.Tensor)), default=0)
    return float(drawn) / rates.random_elements_per_s


# glibc's malloc maps a block this large anew at each allocation (its dynamic mmap threshold stops at 32 MiB on
# 64-bit: DEFAULT_MMAP_THRESHOLD_MAX in malloc/malloc.c), and the kernel zeroes each page at its first touch
FRESH_PAGES_FROM = 32 * 2**20

# advanced indexing: what Rates.gather_elements_per_s prices, by the elements it indexes
_INDEX = frozenset({torch.ops.aten.index})
_INDEX_PUT = frozenset({torch.ops.aten.index_put, torch.ops.aten.index_put_, torch.ops.aten._index_put_impl_})


def gathered_elements(target: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> int | None:
    """The elements an advanced-indexing gather or scatter moves: ``aten.index``'s output, ``aten.index_put``'s
    values (any form); ``None`` for any other op. ``args`` and ``out`` are values (tensors, fake or real)."""
    packet = getattr(target, "overloadpacket", None)
    if packet in _INDEX:
        moved = out
    elif packet in _INDEX_PUT:
        moved = args[2] if len(args) > 2 else kwargs.get("values")
    else:
        return None
    return max((t.numel() for t in pytree.tree_leaves(moved) if isinstance(t, torch.Tensor)), default=0)


def gather_seconds(
    target: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any, rates: Rates
) -> float | None:
    """What an advanced-indexing op's elements (:func:`gathered_elements`) cost at ``rates.gather_elements_per_s``,
    their memory traffic included; ``None`` for any other op or without that rate (price it by its bytes)."""
    if rates.gather_elements_per_s is None:
        return None
    moved = gathered_elements(target, args, kwargs, out)
    return None if moved is None else moved / rates.gather_elements_per_s


def element_seconds(
    target: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any, rates: Rates
) -> float | None:
    """What an op priced by its elements rather than the bytes it moves costs at its own rate: a random op's draws
    (:func:`random_seconds`), an advanced-indexing op's elements (:func:`gather_seconds`); ``None`` for any other op
    or without the rate (price it by its bytes). The capture's cost and the planner's roofline both call it."""
    if rates.random_elements_per_s is not None and draws_random(target, args, kwargs):
        return random_seconds(out, rates)
    return gather_seconds(target, args, kwargs, out, rates)


def fresh_page_seconds(out: Any, rates: Rates, inputs: Sequence[Any] = ()) -> float:
    """What the fresh pages of an op's outputs of :data:`FRESH_PAGES_FROM` bytes or more cost at
    ``rates.fresh_page_bytes_per_s`` (0 without it); an output that is one of ``inputs`` (an in-place op's) is not
    allocated."""
    if rates.fresh_page_bytes_per_s is None:
        return 0.0
    fresh = 0
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and not any(t is a for a in inputs):
            nbytes = t.numel() * t.element_size()
            fresh += nbytes if nbytes >= FRESH_PAGES_FROM else 0
    return fresh / rates.fresh_page_bytes_per_s


def _estimate_cost(node: fx.Node, out_bytes: int, is_view: bool, rates: Rates) -> float:
    """Seconds for one op: FLOPs at the matmul rate + bytes read and written at the bandwidth (a random op: its
    largest output's elements at the random rate; an advanced-indexing op: its indexed elements at the gather rate)
    + its large outputs' fresh pages + dispatch."""
    if is_view:
        return rates.op_overhead_s * 0.5
    flops = _flops(node)
    out = node.meta.get("val")
    fixed = fresh_page_seconds(out, rates) + rates.op_overhead_s
    args, kwargs = pytree.tree_map_only(fx.Node, lambda a: a.meta.get("val"), (node.args, node.kwargs))
    by_elements = element_seconds(node.target, args, kwargs, out, rates)
    if by_elements is not None:
        return flops / rates.flops_per_s + by_elements + fixed
    packet = getattr(node.target, "overloadpacket", None)
    rate = rates.flops_per_s
    if packet is torch.ops.aten.convolution and rates.conv_flops_per_s is not None:
        rate = rates.conv_flops_per_s
    elif packet is torch.ops.aten.convolution_backward and rates.conv_backward_flops_per_s is not None:
        rate = rates.conv_backward_flops_per_s
    read = 0
    for a in _tensor_args(node):
        val = a.meta.get("val")
        if isinstance(val, torch.Tensor):
            read += val.numel() * val.element_size()
    return flops / rate + (read + out_bytes) / rates.bytes_per_s + fixed


def draws_random(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """:func:`_is_random` for an op called with ``args`` and ``kwargs`` (fx nodes or values)."""
    if torch.Tag.nondeterministic_seeded not in getattr(target, "tags", ()):
        return False
    schema = getattr(target, "_schema", None)
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name in ("dropout_p", "train"):
            value = args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
            if arg.name == "dropout_p" and isinstance(value, (int, float)) and float(value) == 0.0:
                return False
            if arg.name == "train" and value is False:
                return False
    return True


def _is_random(node: fx.Node) -> bool:
    """The op draws random numbers: tagged ``nondeterministic_seeded``, and not an attention with ``dropout_p=0``
    or a dropout with ``train=False``."""
    return draws_random(node.target, node.args, node.kwargs)
