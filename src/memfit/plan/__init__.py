"""``memfit.plan``: will *my* model train in N GiB, with which optimizer, precision and remat budget, and how fast?
Answered before anything is allocated.

    est = memfit.plan.estimate(model, loss_fn, batch, memory="24GiB", precision="bf16-autocast")
    est.rows      # PlanRow(optimizer, settings, remat, peak_bytes, breakdown, step_overhead, step_seconds, ...)
    est.best()    # the fastest row that fits

``model`` is any ``nn.Module`` (any device) or a zero-argument factory; ``loss_fn(model, batch)`` returns the
loss; ``batch`` is a pytree of tensors. The preset form ``estimate("gpt2-xl", 8, 1024, memory="24GiB")`` plans
memfit's own models. See ``docs/plan.md`` for how each figure is obtained and how close it is.

Modules: ``_workload`` (model, loss, batch, precision), ``_trace`` (fake-tensor tracing, op costs),
``_optimizers`` (the optimizers compared, their state and update), ``_search`` (the largest batch),
``_rows`` (rows, estimate, table), ``_estimate`` (the plan itself), ``_in_backward`` (rows with the optimizer step
inside the backward, ``estimate(..., step_in_backward=True)``).
"""

from memfit.plan._estimate import DEFAULT_OPTIMIZERS, estimate
from memfit.plan._optimizers import OPTIMIZERS, make_optimizer
from memfit.plan._rows import Estimate, PlanRow, parse_bytes
from memfit.plan._trace import LossError
from memfit.plan._workload import PRECISIONS, PlanInputError, Workload, from_hf, from_module, import_object

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "OPTIMIZERS",
    "PRECISIONS",
    "Estimate",
    "LossError",
    "PlanInputError",
    "PlanRow",
    "Workload",
    "estimate",
    "from_hf",
    "from_module",
    "import_object",
    "make_optimizer",
    "parse_bytes",
]
