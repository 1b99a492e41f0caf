"""``memfit demo``: Adam vs SM3 vs SM3 + remat vs Adafactor on a small GPT, memory by category and time.

Usage::

    report = memfit.demo.run_demo(memfit.demo.DemoConfig(steps=300))
    memfit.demo.plot_report(report, "runs/demo/demo.png")
"""

from memfit.demo._output import make_table, plot_report, write_report
from memfit.demo._run import DemoConfig, RunResult, machine_info, run_demo

__all__ = ["DemoConfig", "RunResult", "machine_info", "make_table", "plot_report", "run_demo", "write_report"]
