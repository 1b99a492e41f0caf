"""memfit.memory.track: misuse gets a clear, typed error, and the tracker always cleans up."""

import pytest
import torch
from torch import nn

from memfit.memory import TrackerError, track


def test_nested_tracking_is_refused_and_outer_survives():
    with track() as outer:
        a = torch.empty(10)
        with pytest.raises(TrackerError, match="already active"), track():
            pass
        b = torch.empty(20)
    assert outer.report.current_bytes == 120
    del a, b


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"nn\.Module.*Linear|nn\.Module.*function"):
        track(model=lambda x: x)
    with pytest.raises(TypeError, match="got Tensor"):
        track(model=torch.zeros(3))


def test_optimizer_must_be_an_optimizer():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer.*got list"):
        track(model, optimizer=list(model.parameters()))


def test_inputs_must_be_tensors():
    with pytest.raises(TypeError, match=r"inputs must hold tensors.*str"):
        track(inputs=[torch.zeros(2), "batch"])


def test_report_before_the_block_ends():
    t = track()
    with pytest.raises(TrackerError, match="new"):
        _ = t.report
    with t, pytest.raises(TrackerError, match="active"):
        _ = t.report
    assert t.report.n_ops == 0


def test_a_tracker_is_used_once():
    t = track()
    with t:
        pass
    with pytest.raises(TrackerError, match="one block"), t:
        pass


def test_mark_and_mark_inputs_outside_the_block():
    t = track()
    with pytest.raises(TrackerError, match="inside"):
        t.mark("x")
    with pytest.raises(TrackerError, match="inside"):
        t.mark_inputs(torch.zeros(1))
    with t, pytest.raises(TypeError, match="str"):
        t.mark(3)


def test_exception_inside_the_block_still_reports_and_releases():
    with pytest.raises(ValueError, match="boom"), track() as t:
        a = torch.empty(25)
        raise ValueError("boom")
    assert t.report.current_bytes == 100
    with track() as t2:  # a new tracker can start: the failed one released the slot
        pass
    assert t2.report.peak_bytes == 0
    del a


def test_breakdown_index_out_of_range():
    with track() as t:
        a = torch.empty(1)
    with pytest.raises(IndexError, match="3 points"):
        t.report.breakdown_at(3)
    with pytest.raises(KeyError, match="no mark 'fwd'"):
        t.report.mark_index("fwd")
    del a


def test_hooks_are_removed_after_the_block():
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with track(model, opt):
        pass
    assert not opt._optimizer_step_post_hooks
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    # The dispatch mode is gone: tracking again works and sees a step made after the first block.
    with track(model, opt) as t:
        model(torch.zeros(1, 4)).sum().backward()
    assert t.report.final_breakdown["gradients"] == sum(p.nbytes for p in model.parameters())
