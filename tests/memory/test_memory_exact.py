"""memfit.memory.track on hand-made allocations: exact bytes against sizes computed in the test."""

import gc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.memory import CATEGORIES, track

# Bytes per element, written out independently of torch's element_size().
DTYPE_BYTES = {torch.float64: 8, torch.float32: 4, torch.float16: 2, torch.int8: 1, torch.int64: 8}


def test_known_tensors_exact_peak_and_current():
    with track() as t:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B, kept
        b = torch.empty(250, dtype=torch.float64)  # 2000 B, freed
        c = torch.zeros(3, 5, dtype=torch.int8)  # 15 B, kept
        del b
        d = torch.empty(10, dtype=torch.float16)  # 20 B, kept
    r = t.report
    assert r.baseline_bytes == 0
    assert r.peak_bytes == 4000 + 2000 + 15  # before b is freed
    assert r.current_bytes == 4000 + 15 + 20
    assert r.total_peak_bytes == r.peak_bytes
    assert r.final_breakdown["temporaries"] == 4000 + 15 + 20
    del a, c, d


def test_views_and_detach_add_nothing():
    with track() as t:
        a = torch.empty(64, 64)
        views = [a.view(-1), a.t(), a[3:10], a.detach(), a.reshape(4096), a.unsqueeze(0), a.T.detach()]
        a.add_(1.0)  # in place: same storage
    r = t.report
    assert r.peak_bytes == r.current_bytes == 64 * 64 * 4
    del a, views


def test_freed_tensor_is_seen_freed_at_the_right_point():
    with track() as t:
        a = torch.empty(100)
        t.mark("allocated")
        del a
        t.mark("freed")
        b = torch.empty(50)
    r = t.report
    assert r.breakdown_at(r.mark_index("allocated"))["temporaries"] == 400
    assert r.breakdown_at(r.mark_index("freed"))["temporaries"] == 0
    assert r.peak_bytes == 400
    assert r.current_bytes == 200
    del b


def test_temporary_inside_an_expression_counts_in_the_peak():
    x = torch.ones(1000)  # before the block: not tracked
    with track() as t:
        y = (x * 2) + 1  # x*2 is a temporary freed right after the add
    r = t.report
    assert r.peak_bytes == 8000  # both the temporary and y are live when add has allocated y
    assert r.current_bytes == 4000
    del y


def test_tensors_alive_before_the_block_are_ignored_even_when_written():
    x = torch.zeros(1000)
    with track() as t:
        x.add_(1)
        x.mul_(2)
        v = x.view(10, 100)
        v.zero_()
    assert t.report.peak_bytes == 0
    assert t.report.n_ops == 4


def test_torch_tensor_literal_is_counted():
    # torch.tensor() builds its data outside dispatch and hands it over through aten.lift_fresh.
    with track() as t:
        s = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert t.report.current_bytes == 24
    del s


def test_resize_in_place_is_followed():
    with track() as t:
        a = torch.empty(10)
        a.resize_(1000)
    assert t.report.current_bytes == 4000
    del a


def test_meta_and_fake_tensors_count_their_nominal_bytes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with track() as t:
        m = torch.empty(128, 256, device="meta")
        n = m @ m.T  # 128x128
    assert t.report.current_bytes == (128 * 256 + 128 * 128) * 4
    assert t.report.devices == ("meta",)
    del m, n

    with FakeTensorMode(), track() as t2:
        f = torch.empty(1000, dtype=torch.float16)
        g = f * 2
        del f
    assert t2.report.peak_bytes == 4000
    assert t2.report.current_bytes == 2000
    del g


def test_inputs_at_entry_are_baseline_and_marked_inputs_relabel():
    x = torch.empty(300)
    with track(inputs=[x]) as t:
        y = torch.empty(20)
        t.mark_inputs(y)
        z = torch.empty(5)
    r = t.report
    assert r.baseline_bytes == 1200
    assert r.baseline_breakdown["inputs"] == 1200
    assert r.final_breakdown["inputs"] == 1200 + 80
    assert r.final_breakdown["temporaries"] == 20
    # y is an input over its whole life, including the point where it was created.
    assert r.breakdown_at(1)["inputs"] == 1280
    del y, z


def _reference_peak_current(sizes_dtypes, program):
    """Replays an allocate/free program with plain integers: the expected peak and final bytes."""
    live: dict[int, int] = {}
    peak = current = 0
    for op, idx in program:
        if op == "alloc":
            n, dtype = sizes_dtypes[idx]
            live[idx] = n * DTYPE_BYTES[dtype]
            current += live[idx]
            peak = max(peak, current)
        elif idx in live:
            current -= live.pop(idx)
    return peak, current


@settings(max_examples=60, deadline=None)
@given(
    sizes_dtypes=st.lists(
        st.tuples(st.integers(0, 5000), st.sampled_from(sorted(DTYPE_BYTES, key=str))),
        min_size=1,
        max_size=12,
    ),
    data=st.data(),
)
def test_random_alloc_free_programs_match_reference(sizes_dtypes, data):
    n = len(sizes_dtypes)
    frees = data.draw(st.lists(st.integers(0, n - 1), max_size=n))
    # Interleave: allocation i, then any frees drawn for indices < i+1 at random positions.
    program = []
    pending = list(frees)
    for i in range(n):
        program.append(("alloc", i))
        while pending and pending[0] <= i:
            program.append(("free", pending.pop(0)))
    tensors = {}
    with track() as t:
        for op, idx in program:
            if op == "alloc":
                size, dtype = sizes_dtypes[idx]
                tensors[idx] = torch.empty(size, dtype=dtype)
                tensors[f"view{idx}"] = tensors[idx][: size // 2]  # a view: no bytes
            else:
                tensors.pop(idx, None)
                tensors.pop(f"view{idx}", None)
    peak, current = _reference_peak_current(sizes_dtypes, program)
    assert t.report.peak_bytes == peak
    assert t.report.current_bytes == current
    total = t.report.timeline_total
    assert total.max() == t.report.total_peak_bytes
    del tensors


def test_timeline_sums_and_points():
    with track() as t:
        a = torch.ones(10)
        b = a + a
        del a
    r = t.report
    assert len(r.timeline_ops) == r.n_ops + 2
    assert r.timeline_ops[0] == "<entry>" and r.timeline_ops[-1] == "<exit>"
    stacked = np.sum([r.timeline[c] for c in CATEGORIES], axis=0)
    np.testing.assert_array_equal(stacked, r.timeline_total)
    # entry 0; after ones 40; after add 80; exit 40 (a freed)
    assert list(r.timeline_total) == [0, 40, 80, 40]
    del b


def test_frees_after_the_block_are_not_recorded():
    with track() as t:
        a = torch.empty(100)
    before = t.report.to_dict()
    del a
    gc.collect()
    assert t.report.to_dict() == before
    assert t.report.current_bytes == 400


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_dtype_bytes(dtype):
    expected = {torch.float32: 4, torch.bfloat16: 2, torch.complex64: 8}[dtype]
    with track() as t:
        a = torch.zeros(7, 3, dtype=dtype)
    assert t.report.current_bytes == 21 * expected
    del a
