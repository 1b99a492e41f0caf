"""The optimizers the demo compares, by a short name shared with ``benchmarks/demo_tuning.py``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

import torch

from memfit.optim import SM3

__all__ = ["OptimizerKind", "build_optimizer", "describe_optimizer"]

OptimizerKind = Literal["adam", "sm3", "sm3-bf16", "adafactor"]

_DESCRIPTIONS: dict[str, str] = {
    "adam": "torch.optim.Adam",
    "sm3": "memfit.optim.SM3, no momentum (state: one accumulator per row and column)",
    "sm3-bf16": "memfit.optim.SM3, momentum 0.9 in a bfloat16 buffer (+ 2 bytes per parameter)",
    "adafactor": "torch.optim.Adafactor",
}


def describe_optimizer(kind: str) -> str:
    """One line saying what ``kind`` is."""
    _check(kind)
    return _DESCRIPTIONS[kind]


def _check(kind: str) -> None:
    if kind not in get_args(OptimizerKind):
        raise ValueError(f"unknown demo optimizer {kind!r}; known: {', '.join(get_args(OptimizerKind))}")


def build_optimizer(kind: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer ``kind`` over ``params`` at learning rate ``lr`` (every other setting: its default).

    Raises:
        ValueError: an unknown ``kind`` (the message lists the known ones).
    """
    _check(kind)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sm3":
        return SM3(params, lr=lr, momentum=0.0)
    if kind == "sm3-bf16":
        return SM3(params, lr=lr, momentum=0.9, momentum_dtype=torch.bfloat16)
    return torch.optim.Adafactor(params, lr=lr)
