"""``track()`` around a ``torch.compile``'d function: it stays compiled, inside the block and after it; code that runs
as ATen ops (backend ``aot_eager``) is measured, inductor's kernels (allocations outside dispatch) are reported as
unmeasurable with a clear error."""

import pytest
import torch

from memfit.memory import TrackerError, track


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))


def _counting(inner):
    """A torch.compile backend that counts how often the compiled graph runs (and compiles with ``inner``)."""
    runs = {"compiled": 0, "runs": 0}

    def backend(gm, example_inputs):
        runs["compiled"] += 1
        fn = inner(gm, example_inputs)

        def run(*args):
            runs["runs"] += 1
            return fn(*args)

        return run

    return backend, runs


def test_a_compiled_function_stays_compiled_and_is_measured_when_it_runs_aten_ops():
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    model, x = _model(), torch.randn(64, 32)
    backend, runs = _counting(aot_eager)
    f = torch.compile(lambda x: model(x).sum(), backend=backend)
    f(x).backward()
    assert runs == {"compiled": 1, "runs": 1}
    with track(model) as t:
        f(x).backward()
    # compiled in the block (a dispatch mode used to force eager)...
    assert runs == {"compiled": 1, "runs": 2}
    f(x).backward()
    # ...and after it (it used to stay eager for good)
    assert runs == {"compiled": 1, "runs": 3}
    for p in model.parameters():
        p.grad = None
    with track(model) as eager:
        model(x).sum().backward()
    # aot_eager runs the same aten ops: the same storages, one by one
    assert t.report.peak_bytes == eager.report.peak_bytes > 64 * 256 * 4


@pytest.mark.slow
def test_inductor_kernels_are_reported_as_unmeasurable_and_stay_compiled():
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    model, x = _model(), torch.randn(64, 32)
    backend, runs = _counting(compile_fx)
    f = torch.compile(lambda x: model(x).sum(), backend=backend)
    f(x).backward()
    with pytest.raises(TrackerError, match="inductor") as exc, track(model) as t:
        f(x).backward()
    assert "stays compiled" in str(exc.value)
    assert t.report is not None  # what it did see is still there
    assert runs["runs"] == 2
    f(x).backward()
    assert runs == {"compiled": 1, "runs": 3}
