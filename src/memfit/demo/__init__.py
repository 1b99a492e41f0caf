"""``memfit demo``: Adam vs SM3 (with and without momentum) vs SM3 + remat vs Adafactor on a small GPT, and what
SM3 + remat's saved memory buys at equal memory: memory by category, time and loss.

Usage::

    report = memfit.demo.run_demo(memfit.demo.DemoConfig(steps=300))
    memfit.demo.plot_report(report, "runs/demo/demo.png")
"""

from memfit.demo._equal import EqualMemoryPlan, plan_equal_memory
from memfit.demo._optim import OptimizerKind, build_optimizer, describe_optimizer
from memfit.demo._output import make_table, plot_report, write_report
from memfit.demo._run import DemoConfig, RunResult, machine_info, run_demo

__all__ = [
    "DemoConfig",
    "EqualMemoryPlan",
    "OptimizerKind",
    "RunResult",
    "build_optimizer",
    "describe_optimizer",
    "machine_info",
    "make_table",
    "plan_equal_memory",
    "plot_report",
    "run_demo",
    "write_report",
]
