"""The SM3 authors' warm-up schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memfit.optim import SM3, sm3_lr_factor, sm3_warmup_schedule


@pytest.mark.parametrize("warmup", [1, 4, 10])
def test_quadratic_warmup_then_constant(warmup):
    for t in range(3 * warmup):
        expected = min(1.0, (t / warmup) ** 2)  # lr_t = lr * min(1, (t / warmup)^2)
        assert sm3_lr_factor(t, warmup_steps=warmup) == pytest.approx(expected, rel=1e-15)
    assert sm3_lr_factor(warmup // 2, warmup_steps=warmup) <= 0.25 + 1e-12  # ramps *up* (not inverted)


def test_linear_cooldown_reaches_final_ratio():
    kw = {"warmup_steps": 2, "total_steps": 10, "cooldown_steps": 4, "final_ratio": 0.2}
    factors = [sm3_lr_factor(t, **kw) for t in range(12)]
    assert factors[:6] == [0.0, 0.25, 1.0, 1.0, 1.0, 1.0]
    assert factors[6:11] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert factors[11] == pytest.approx(0.2)


def test_schedule_drives_an_optimizer():
    p = nn.Parameter(torch.zeros(2))
    opt = SM3([p], lr=0.1, fused=False)
    sched = sm3_warmup_schedule(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * min(1, (t / 4) ** 2) for t in range(6)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"warmup_steps": 1, "cooldown_steps": 3}, "needs total_steps"),
        ({"warmup_steps": 5, "total_steps": 6, "cooldown_steps": 3}, "must be >= warmup_steps"),
        ({"warmup_steps": 1, "final_ratio": 2.0}, r"final_ratio must be in \[0, 1\]"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sm3_lr_factor(0, **kwargs)
