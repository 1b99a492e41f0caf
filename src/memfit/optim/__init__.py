"""Optimizers with sublinear state: SM3, and the count-sketch baseline.

Adam, Adagrad and Adafactor come from :mod:`torch.optim`; memfit does not re-implement them.

Usage::

    opt = memfit.optim.SM3(model.parameters(), lr=0.1, momentum=0.9)
    sched = memfit.optim.sm3_warmup_schedule(opt, warmup_steps=1000)
"""

from memfit.optim._countsketch import CountSketchAdam
from memfit.optim._in_backward import StepInBackward, step_in_backward
from memfit.optim._nonfinite import NonFiniteGradientError
from memfit.optim._schedule import sm3_lr_factor, sm3_warmup_schedule
from memfit.optim._sm3 import SM3, SM3_STATE_FORMAT, SM3SetupError
from memfit.optim._sm3_kernels import sm3

__all__ = [
    "SM3",
    "SM3_STATE_FORMAT",
    "CountSketchAdam",
    "NonFiniteGradientError",
    "SM3SetupError",
    "StepInBackward",
    "sm3",
    "sm3_lr_factor",
    "sm3_warmup_schedule",
    "step_in_backward",
]
