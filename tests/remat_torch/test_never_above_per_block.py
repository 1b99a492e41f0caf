"""Never above per-block checkpointing (issue 14, item 3): on captured models, memfit's least reachable peak is at
most the peak of checkpointing every block's input, expressed as a schedule on the same captured graph.

The block inputs are found by value: the captured step runs once through ``torch.fx.Interpreter`` and the model
once eagerly with a pre-hook on each block; a graph value equal to a block's input is that block's checkpoint.
Models run in eval mode (no dropout draws, BatchNorm running statistics) so the two runs agree value for value.
"""

import pytest
import torch
from torch import nn

from memfit.remat.core import solve
from memfit.remat.core.solvers._improve import seq_peak
from memfit.remat.core.solvers.budget import min_peak_budget
from memfit.remat.core.solvers.checkpoint import keep_sequence
from memfit.remat.eager.capture import capture, flatten_batch, module_tensors

from . import models
from .zoo import BUILDERS, blocks


def _block_inputs(model, loss_fn, batch, mods):
    model.eval()
    c = capture(model, loss_fn, batch)
    g = c.graph
    names = [*c.param_names, *c.buffer_names]
    flat, _spec = flatten_batch(batch)
    env = {}

    class _Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            env[n] = out
            return out

    args = [t.detach().clone() for t in [*module_tensors(model, names), *flat]]
    if c.rng_device is not None:
        args.append(0)
    with torch.no_grad():
        _Record(c.gm).run(*args)
    seen = []

    def hook(_m, a, kw):
        x = a[0] if a else kw.get("hidden_states", next(iter(kw.values())))
        seen.append(x.detach().clone())

    hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods]
    with torch.no_grad():
        loss_fn(model, batch)
    for h in hooks:
        h.remove()
    ids = []
    for t in seen:
        for v, r in enumerate(c.refs):
            if r is None or g.is_input(v) or g.nbytes(v) == 0:
                continue
            val = env.get(r.node)
            if r.index is not None and isinstance(val, (tuple, list)):
                val = val[r.index]
            same = isinstance(val, torch.Tensor) and val.shape == t.shape and val.dtype == t.dtype
            if same and torch.allclose(val, t, atol=1e-5, rtol=1e-4):
                ids.append(v)
                break
    return g, ids, len(seen)


def _check(model, loss_fn, batch, mods):
    g, ids, n_blocks = _block_inputs(model, loss_fn, batch, mods)
    assert len(ids) >= n_blocks - 1  # the first block may read the batch itself (an input: kept anyway)
    per_block = seq_peak(g, keep_sequence(g, ids))
    least = min_peak_budget(g, keep_sets={"blocks": ids})
    assert least <= per_block
    assert solve(g, per_block, keep_sets={"blocks": ids}).peak <= per_block
    return g, per_block, least


def test_remat_test_models():
    cnn = models.cnn(blocks=3)
    _check(cnn, models.xent, models.image_batch(), [m for m in cnn if isinstance(m, models.ResBlock)])
    mlp = models.mlp(depth=4)
    _check(mlp, models.xent, models.vector_batch(), [m for m in mlp if isinstance(m, nn.Linear)])


def _zoo_blocks(model):
    """The zoo's blocks, or for HF models the layers ``gradient_checkpointing_enable`` wraps: the items of each
    outermost ``nn.ModuleList`` of like modules (BERT's ``layer``, Llama's ``layers``, T5's two ``block`` lists)."""
    try:
        return blocks(model)
    except ValueError:
        pass
    out, inside = [], set()
    for _name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(x) for x in m}) == 1:
            out += list(m)
            inside |= {id(x) for x in m.modules()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_zoo_models(name):
    model, loss_fn, batch = BUILDERS[name]("tiny")
    g, per_block, least = _check(model, loss_fn, batch, _zoo_blocks(model))
    inputs = g.input_bytes
    noremat = solve(g, method="noremat").peak - inputs
    print(
        f"{name}: per-block {(per_block - inputs) / noremat:.3f}, memfit least {(least - inputs) / noremat:.3f}"
    )
