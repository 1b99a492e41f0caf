"""Every memory claim is a test: SM3's state, measured by memfit.memory on a real model, equals the formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memfit.memory
from memfit.optim import SM3


class TinyGPT(nn.Module):
    """Embedding, two pre-LN MLP blocks with attention-shaped projections, tied head: GPT-2's shape classes."""

    def __init__(self, vocab=97, dim=24, ctx=16, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = x + block(x)
        return self.ln_f(x) @ self.wte.weight.T


def _formula(model, momentum_bytes_per_elem=0):
    total = 0
    for p in model.parameters():
        acc = 4 * (sum(p.shape) if p.dim() >= 2 else p.numel())
        total += acc + 4 + momentum_bytes_per_elem * p.numel()  # + the 0-d float32 step counter
    return total


@pytest.mark.parametrize(
    ("kwargs", "momentum_bytes"),
    [
        ({"momentum": 0.0}, 0),
        ({"momentum": 0.9}, 4),
        ({"momentum": 0.9, "momentum_dtype": torch.bfloat16}, 2),
    ],
    ids=["mom0", "mom0.9", "mom0.9-bf16"],
)
@pytest.mark.parametrize("fused", [False, True])
def test_state_bytes_measured_equal_formula(kwargs, momentum_bytes, fused):
    torch.manual_seed(0)
    model = TinyGPT()
    opt = SM3(model.parameters(), lr=0.05, fused=fused, **kwargs)
    idx = torch.randint(0, 97, (3, 16))
    with memfit.memory.track(model, opt, inputs=idx) as t:
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
    measured = t.report.final_breakdown["optimizer_state"]
    assert measured == _formula(model, momentum_bytes)
    # Cross-check against the state tensors themselves.
    direct = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
    assert measured == direct
    if not kwargs.get("momentum"):
        params = sum(p.numel() for p in model.parameters())
        assert measured < 0.1 * 4 * params  # sublinear: a small fraction of one fp32 copy of the model
