"""A HF transformers GPT-2 (built offline from a small config) through memfit.remat.compile."""

import copy

import pytest
import torch
import transformers  # a test extra (pyproject's `dev`), installed by `make setup`

import memfit.remat
from memfit.memory import track


def _gpt2(n_layer=2, n_embd=64, dropout=0.0):
    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=256, n_positions=64,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"  # HF's default loss lookup breaks the graph
    return model


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _check(n_layer, budgets):
    torch.manual_seed(0)
    model = _gpt2(n_layer=n_layer)
    ids = torch.randint(0, 256, (4, 48))
    eager = copy.deepcopy(model)
    eager_loss = lm_loss(eager, ids)
    eager_loss.backward()
    base_model = copy.deepcopy(model)
    base = memfit.remat.compile(base_model, lm_loss, ids)
    base_loss = base(ids)
    torch.testing.assert_close(base_loss, eager_loss.detach())
    for (n, p), (_, q) in zip(base_model.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    for budget in budgets:
        m = copy.deepcopy(model)
        step = memfit.remat.compile(m, lm_loss, ids, budget=budget)
        with track() as t:
            loss = step(ids)
        assert torch.equal(loss, base_loss)
        for (n, p), (_, q) in zip(m.named_parameters(), base_model.named_parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), (budget, n)
        assert t.report.peak_bytes == pytest.approx(step.plan.peak_bytes, rel=0.10)
        assert t.report.peak_bytes <= 1.10 * step.plan.budget_bytes


def test_gpt2_half_budget_is_bitwise_equal_and_measured():
    _check(n_layer=2, budgets=[0.5])


@pytest.mark.slow
def test_gpt2_budget_sweep():
    _check(n_layer=4, budgets=[1.0, 0.7, 0.5, 0.3])
