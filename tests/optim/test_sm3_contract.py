"""SM3 against the hardening items of issue 16: non-finite gradients, hook order, bf16 momentum, bad input.

Each test pins one property a careful user relies on; the paths (for-loop, foreach, fused) must agree.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from memfit.optim import SM3, NonFiniteGradientError, SM3SetupError

PATHS = {
    "for-loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(6, 5, generator=gen)), nn.Parameter(torch.randn(7, generator=gen))]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _run(opt, params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_snapshot_equal(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for pid, state in a[1].items():
        for key, value in state.items():
            assert torch.equal(value, b[1][pid][key]), (pid, key)


# ----------------------------------------------------------------------------- 1. non-finite gradients
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_default_raises_on_one_nonfinite_entry_and_changes_nothing(path, bad):
    params, clean = _params(), _params()
    opt = SM3(params, lr=0.1, **PATHS[path])
    ref = SM3(clean, lr=0.1, **PATHS[path])
    for s in range(2):
        _run(opt, params, _grads(params, s))
        _run(ref, clean, _grads(clean, s))
    before = _snapshot(opt, params)
    grads = _grads(params, 2)
    grads[0][3, 1] = bad
    with pytest.raises(NonFiniteGradientError, match=r"\[6, 5\]: (1 NaN, 0 inf|0 NaN, 1 inf)") as info:
        _run(opt, params, grads)
    assert isinstance(info.value, RuntimeError) and "Nothing was updated" in str(info.value)
    assert info.value.offenders == [
        ("param_groups[0]['params'][0]", (6, 5), int(bad != bad), int(bad == bad))
    ]
    _assert_snapshot_equal(before, _snapshot(opt, params))
    # The rejected step left no trace: the next finite step equals a run that never saw it.
    _run(opt, params, _grads(params, 3))
    _run(ref, clean, _grads(clean, 3))
    _assert_snapshot_equal(_snapshot(ref, clean), _snapshot(opt, params))


def test_raise_names_named_parameters_and_checks_sparse_gradients():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SM3(emb.named_parameters(), lr=0.1, momentum=0.0)
    emb.weight.grad = torch.sparse_coo_tensor(
        torch.tensor([[2, 4]]),
        torch.tensor([[1.0, float("nan"), 0.0], [1.0, 2.0, 3.0]]),
        (10, 3),
        check_invariants=True,
    )
    with pytest.raises(NonFiniteGradientError, match=r"weight \[10, 3\]: 1 NaN, 0 inf"):
        opt.step()


@pytest.mark.parametrize("path", list(PATHS))
def test_skip_leaves_the_group_as_it_was_warns_and_counts(path):
    params, clean = _params(), _params()
    p_other, p_other_ref = nn.Parameter(torch.ones(4, 2)), nn.Parameter(torch.ones(4, 2))
    opt = SM3([{"params": params}, {"params": [p_other]}], lr=0.1, nonfinite="skip", **PATHS[path])
    ref = SM3([{"params": clean}, {"params": [p_other_ref]}], lr=0.1, **PATHS[path])
    _run(opt, params, _grads(params, 0))
    _run(ref, clean, _grads(clean, 0))
    grads = _grads(params, 1)
    grads[1][2] = float("-inf")
    p_other.grad = torch.full((4, 2), 0.5)
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        _run(opt, params, grads)
    assert opt.nonfinite_skips == 1
    _assert_snapshot_equal(_snapshot(ref, clean), (params, {k: opt.state_dict()["state"][k] for k in (0, 1)}))
    assert opt.state[params[0]]["step"] == 1  # the skipped group's step count did not move
    p_other_ref.grad = torch.full((4, 2), 0.5)
    ref.step()  # the other group (finite gradients) did step
    assert torch.equal(p_other, p_other_ref) and not torch.equal(p_other, torch.ones(4, 2))


def test_propagate_puts_the_nan_in_the_parameters_identically_on_every_path():
    """One NaN entry at (3, 1): the parameter shows it (no silent freeze), then its row and column."""
    masks = {}
    for path, flags in PATHS.items():
        params = _params()
        opt = SM3(params, lr=0.1, nonfinite="propagate", **flags)
        grads = _grads(params, 0)
        grads[0][3, 1] = float("nan")
        _run(opt, params, grads)
        state = opt.state[params[0]]
        first = (params[0].isnan(), state["accumulator_0"].isnan(), state["accumulator_1"].isnan())
        _run(opt, params, _grads(params, 1))
        masks[path] = (*first, params[0].isnan(), state["momentum_buffer"].isnan())
        # Step 2 read row 3's and column 1's NaN accumulators: every accumulator is NaN now (loud).
        assert state["accumulator_0"].isnan().all() and state["accumulator_1"].isnan().all()
        assert not params[1].isnan().any()
    expected_1 = torch.zeros(6, 5, dtype=torch.bool)
    expected_1[3, 1] = True
    expected_2 = torch.zeros(6, 5, dtype=torch.bool)
    expected_2[3, :] = True
    expected_2[:, 1] = True
    for path, (m1, a0, a1, m2, mb) in masks.items():
        assert torch.equal(m1, expected_1), path
        assert torch.equal(m2, expected_2), path
        assert a0.reshape(-1).tolist() == [i == 3 for i in range(6)], path
        assert a1.reshape(-1).tolist() == [j == 1 for j in range(5)], path
        assert torch.equal(mb, expected_2), path


def test_an_unknown_nonfinite_policy_is_refused():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip', 'propagate'\)"):
        SM3(_params(), nonfinite="ignore")


# ------------------------------------------------------------------------------ 2. load_state_dict hooks
@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
def test_load_state_dict_honours_pre_and_post_hooks(momentum_dtype):
    params = _params()
    opt = SM3(params, lr=0.1, momentum_dtype=momentum_dtype, fused=False)
    _run(opt, params, _grads(params, 0))
    sd = opt.state_dict()
    target = SM3(_params(1), lr=0.1, momentum_dtype=momentum_dtype, fused=False)

    def pre_hook(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["accumulator_0"] = state_dict["state"][0]["accumulator_0"] * 2 + 1
        return state_dict

    def post_hook(optimizer):
        for state in optimizer.state.values():
            state["momentum_buffer"].fill_(0.25)

    target.register_load_state_dict_pre_hook(pre_hook)
    target.register_load_state_dict_post_hook(post_hook)
    target.load_state_dict(sd)
    loaded = target.state[target.param_groups[0]["params"][0]]
    assert torch.equal(loaded["accumulator_0"], sd["state"][0]["accumulator_0"] * 2 + 1)
    assert loaded["accumulator_0"].dtype == torch.float32
    for state in target.state.values():
        buf = state["momentum_buffer"]
        assert buf.dtype == (momentum_dtype or torch.float32) and torch.all(buf == 0.25)
    # SM3's own format check sees the state dict as the pre-hooks leave it (a hook may migrate it).
    sd["memfit_sm3_format"] = 99
    fresh = SM3(_params(1), lr=0.1, fused=False)
    with pytest.raises(ValueError, match="format 99 is newer"):
        fresh.load_state_dict(sd)
    fresh.register_load_state_dict_pre_hook(lambda o, d: {**d, "memfit_sm3_format": 1})
    fresh.load_state_dict(sd)
    assert len(fresh._optimizer_load_state_dict_pre_hooks) == 1  # SM3's own hooks are removed again
    assert len(fresh._optimizer_load_state_dict_post_hooks) == 0


# ---------------------------------------------------------------------------------- 3. bf16 momentum
def test_bf16_momentum_is_rounded_once_and_fused_equals_foreach_bitwise():
    shapes = [(40, 25), (33,)]
    results = {}
    for path, flags in PATHS.items():
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = SM3(params, lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16, **flags)
        for s in range(3):
            _run(opt, params, _grads(params, 10 + s))
        results[path] = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in params]
    for path in ("foreach", "fused"):
        for (p_a, m_a), (p_b, m_b) in zip(results["for-loop"], results[path], strict=True):
            assert torch.equal(p_a, p_b) and torch.equal(m_a, m_b), path
    # Rounded once: the buffer after one step from a known state is the float64 average rounded to bf16.
    p = nn.Parameter(torch.zeros(1000))
    opt = SM3([p], lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16, fused=False)
    _run(opt, [p], [torch.ones(1000)])  # nu = 1 everywhere from now on, u = g / sqrt(nu + g^2)
    m0 = opt.state[p]["momentum_buffer"].double()
    g = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    _run(opt, [p], [g])
    u = g.double() / torch.sqrt(1.0 + g.double() ** 2)
    expected = (0.9 * m0 + 0.1 * u).to(torch.bfloat16)
    mismatches = int((opt.state[p]["momentum_buffer"] != expected).sum())
    assert mismatches <= 2, f"{mismatches} of 1000 bf16 entries are not the once-rounded average"


# ------------------------------------------------------------------- 4. complex, 5. zero-size params
def test_complex_parameters_are_refused_in_add_param_group_too():
    opt = SM3([nn.Parameter(torch.zeros(2))], fused=False)
    with pytest.raises(SM3SetupError, match="SM3 does not support complex parameters") as info:
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.complex64))]})
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("variant", ["I", "II"])
def test_zero_size_parameters_step_like_torch_optimizers(path, variant):
    empties = [nn.Parameter(torch.zeros(s)) for s in [(0, 5), (3, 0), (0,), (2, 0, 4)]]
    live, live_ref = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3, 2))
    opt = SM3([*empties, live], lr=0.1, variant=variant, **PATHS[path])
    ref = SM3([live_ref], lr=0.1, variant=variant, **PATHS[path])
    for s in range(2):
        for e in empties:
            e.grad = torch.zeros_like(e)
        live.grad = torch.randn(3, 2, generator=torch.Generator().manual_seed(s))
        live_ref.grad = live.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(live, live_ref)
    assert opt.state[empties[0]]["accumulator_1"].shape == (1, 5)
    assert torch.all(opt.state[empties[0]]["accumulator_1"] == 0)  # max over no entries: 0
    assert all(opt.state[e]["step"] == 2 for e in empties)


# ------------------------------------------------------------------------------------------ 6. errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "Tensor lr must be 1-element"),
        ({"lr": "0.1"}, TypeError, "lr must be a float or a 1-element tensor, got str '0.1'"),
        ({"momentum": "0.9"}, TypeError, "momentum must be a real number, got str"),
        ({"foreach": True, "fused": True}, RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    ],
)
def test_errors_have_torchs_types_and_messages(kwargs, error, match):
    with pytest.raises(error, match=match):
        SM3([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_fused_true_on_meta_parameters_raises_runtime_error_like_torch():
    meta = nn.Parameter(torch.empty(3, 2, device="meta"))
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point"):
        SM3([meta], fused=True)
    opt = SM3([nn.Parameter(torch.zeros(2))], fused=True)
    with pytest.raises(RuntimeError, match=r"but torch\.float32 and meta"):
        opt.add_param_group({"params": [meta]})
    SM3([meta], fused=None)  # the default falls back to foreach off CPU


# ---------------------------------------------------------------------------------- 7. sparse warning
def _sparse(rows, shape):
    values = torch.ones(len(rows), *shape[1:])
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": 0.9}, r"momentum=0\.9 is not applied to them"),
        ({"momentum": 0.0, "beta2": 0.5}, r"beta2=0\.5 decays only the accumulators of the rows"),
    ],
)
def test_sparse_gradients_warn_once_what_they_ignore(kwargs, match):
    p = nn.Parameter(torch.zeros(5, 3))
    opt = SM3([p], lr=0.1, **kwargs)
    p.grad = _sparse([1, 3], (5, 3))
    with pytest.warns(UserWarning, match=match):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once per optimizer


def test_sparse_gradients_without_momentum_or_decay_do_not_warn():
    p = nn.Parameter(torch.zeros(5, 3))
    opt = SM3([p], lr=0.1, momentum=0.0)
    p.grad = _sparse([1, 3], (5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
