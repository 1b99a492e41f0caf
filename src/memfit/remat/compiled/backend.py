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
   value read by several ops when inductor would store it (:class:`~memfit.remat.compiled.fusion._Fusion`). A
   pointwise value read by a fused op (pointwise or reduction) lives inside the fused kernel and takes no memory. A
   backward matmul whose only reader is an add runs at that add, as the ``addmm`` inductor's post-grad pass makes of
   the two (:func:`~memfit.remat.compiled.fusion._addmm_fusions`): with an LM head tied to the embedding, that
   holds the logits' gradient to the end of the backward.
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

The pieces: :mod:`~memfit.remat.compiled.fusion` (inductor's fusion rules), :mod:`~memfit.remat.compiled.model`
(the memory and cost model, the greedy passes), :mod:`~memfit.remat.compiled.choose` (the frontier and the choice,
:class:`CompiledPlan`), and this module (the backend, the partitioner hook, the refining compile).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from memfit import _compat
from memfit.remat.compiled import choose
from memfit.remat.compiled.choose import CompiledPlan
from memfit.remat.compiled.fusion import _nbytes
from memfit.remat.compiled.model import _held_bytes
from memfit.remat.eager.costs import Rates, check_rates

__all__ = ["CompiledPlan", "MemfitBackend", "backend"]

log = logging.getLogger(__name__)

# Refinement (MemfitBackend.__call__): a second compile when inductor's buffer plan exceeds the budget or leaves more
# than _SLACK of it unused; the model's aim is scaled by _AIM times the ratio of the model's peak to inductor's.
_SLACK = 0.03
_AIM = 0.99


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
        check_rates(rates)
        self.rates = rates
        self.refine = refine and budget is not None and compiler == "inductor"
        self._scale = 1.0
        # the refining compile's budget in bytes, as the first compile resolved it
        self._budget_bytes: int | None = None
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
        # each joint graph's frontier, for the refining compile (choose.partition)
        self._frontiers: dict[str, choose._Frontier] = {}
        # per plan: bytes of each saved forward input that inductor's forward returns as a copy of its own
        self._copies: dict[int, dict[str, int]] = {}

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
        self._budget_bytes = None
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
                self._warn_layout_copies(plan)
                return first
            over = plan.compiled_peak_bytes > plan.budget_bytes
            under = plan.compiled_peak_bytes < (1.0 - _SLACK) * plan.budget_bytes
            if not (over or under):
                return first
            # inductor's plan misses the budget memfit's model aimed at: over it, or leaving more than _SLACK of it
            # unused (recomputing more than needed). Aim the model by the ratio of the two (a little low) and compile
            # once more. Over: keep whichever peaks lower. Under: keep the second if it fits and recomputes less.
            # Over with layout copies of parameters saved for the backward (inductor's layout optimisation, which no
            # choice of saved values removes): the second compile turns that optimisation off (the model reads
            # inductor's config: fusion._layout_opt).
            layout_off = over and plan.layout_copy_bytes > 0
            self._scale = _AIM * plan.predicted_peak_bytes / plan.compiled_peak_bytes
            # the budget in bytes as the first compile resolved it (a fraction is of torch's partition as inductor
            # would otherwise build it, layout copies included)
            self._budget_bytes = plan.budget_bytes
            self.plans.pop()
            try:
                with (
                    inductor_config.patch(layout_optimization=False)
                    if layout_off
                    else contextlib.nullcontext()
                ):
                    second = compile_fx(gm, example_inputs, inner_compile=self._inner_compile)
            finally:
                self._budget_bytes = None
            again = self.plans[-1]
            if again.compiled_peak_bytes is not None and (
                again.compiled_peak_bytes <= plan.compiled_peak_bytes
                if over
                else again.compiled_peak_bytes <= plan.budget_bytes
                and again.recompute_cost_s < plan.recompute_cost_s
            ):
                self.plans[-1] = dataclasses.replace(
                    again,
                    refined=True,
                    layout_optimization_off=layout_off,
                    full_peak_bytes=plan.full_peak_bytes,  # torch's partition as torch.compile builds it
                )
                self._warn_layout_copies(self.plans[-1])
                return second
            self.plans[-1] = plan
            self._warn_layout_copies(plan)
            return first

    @staticmethod
    def _warn_layout_copies(plan: CompiledPlan | None) -> None:
        """A warning when layout copies of parameters keep inductor's plan above the budget."""
        if (
            plan is None
            or not plan.layout_copy_bytes
            or plan.budget_bytes is None
            or plan.compiled_peak_bytes is None
            or plan.compiled_peak_bytes <= plan.budget_bytes
        ):
            return
        warnings.warn(
            f"memfit.remat.backend: inductor's layout optimisation saves {plan.layout_copy_bytes / 2**20:.1f} MiB of "
            "channels-last copies of parameters for the backward (its plan peaks at "
            f"{plan.compiled_peak_bytes / 2**20:.1f} MiB, budget {plan.budget_bytes / 2**20:.1f} MiB); no choice of "
            "saved values removes them. torch._inductor.config.layout_optimization = False does (refine=True "
            "tries that when over budget).",
            stacklevel=3,
        )

    def _inner_compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        """Inductor's own ``compile_fx_inner``, then its buffer plan read from the generated code."""
        from torch._inductor.compile_fx import compile_fx_inner

        out = compile_fx_inner(gm, example_inputs, **kwargs)
        source = getattr(out, "source_code", None)
        if not self.plans or not isinstance(source, str):
            return out
        i = len(self.plans) - 1
        backward = bool(kwargs.get("is_backward", False))
        copies = self._copies.get(i, {}) if backward else {}
        # parameters exist anyway; a saved "parameter" the forward returned as a layout copy of its own (inductor's
        # layout optimisation saves channels-last copies of convolution weights) does not
        arg_bytes = {
            n.name: copies.get(n.name, 0) if n.name.startswith("primals") else _nbytes(n.meta.get("val"))
            for n in gm.graph.nodes
            if n.op == "placeholder"
        }
        floats = [
            v.element_size()
            for n in gm.graph.nodes
            if n.op == "placeholder"
            and isinstance(v := n.meta.get("val"), torch.Tensor)
            and v.is_floating_point()
        ]
        # fallback kernels' outputs: their dtype is not in the wrapper; the graph's float inputs' is the likely one
        wrapper = _compat.inductor_wrapper_plan(
            source, arg_bytes, max(floats, default=4), onednn_scratch=_onednn_convolutions(gm)
        )
        if wrapper is None:
            return out
        peak = wrapper.peak
        if not backward:
            self._fw_peak[i] = peak
            outputs = gm.graph.output_node().args[0]
            if isinstance(outputs, (list, tuple)) and len(outputs) == len(wrapper.returned):
                self._copies[i] = {
                    a.name: b
                    for a, b in zip(outputs, wrapper.returned, strict=True)
                    if isinstance(a, fx.Node) and a.op == "placeholder" and b > 0
                }
        elif i in self._fw_peak:
            plan = self.plans[i]
            whole = max(self._fw_peak.pop(i), peak + self._held.get(i, 0))
            feasible = plan.feasible if plan.budget_bytes is None else whole <= plan.budget_bytes
            self.plans[i] = dataclasses.replace(
                plan,
                compiled_peak_bytes=whole,
                feasible=feasible,
                layout_copy_bytes=sum(self._copies.pop(i, {}).values()),
            )
        return out

    # ------------------------------------------------------------------------------------------------
    def _partition(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], min_cut: Any, **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        t0 = time.perf_counter()
        plan, fw_gm, bw_gm = choose.partition(
            gm,
            joint_inputs,
            min_cut,
            kwargs,
            budget=self.budget if self._budget_bytes is None else self._budget_bytes,
            scale=self._scale,
            rates=self.rates,
            fused=self._fused,
            memo=self._frontiers,
        )
        return self._done(plan, fw_gm, bw_gm, t0, int(kwargs["num_fwd_outputs"]))

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


def _onednn_convolutions(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s convolutions run in oneDNN (a CPU graph, torch built with it and not turned off), whose calls
    hold buffers of their own (:func:`memfit._compat.inductor_wrapper_plan`)."""
    mkldnn = torch.backends.mkldnn
    return bool(mkldnn.is_available() and mkldnn.enabled) and choose._device_of(gm).type == "cpu"


@functools.cache
def _source_hash() -> str:
    """A hash of the sources that make memfit's choice (the compiled path's modules and the cost model's)."""
    from memfit.remat.eager import capture as _capture
    from memfit.remat.eager import costs as _costs

    here = Path(__file__).parent
    h = hashlib.sha256()
    for path in [
        *(here / f"{m}.py" for m in ("fusion", "model", "choose", "backend")),
        Path(_capture.__file__),
        Path(_costs.__file__),
    ]:
        h.update(path.read_bytes())
    return h.hexdigest()


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
