"""The plan's step-time roofline prices the ops the remat capture prices apart: a random op by its draws, the CPU
flash attention and grouped matmuls by their FLOPs (at the float32 rate for attention in any dtype)."""

import pytest
import torch

from memfit.plan._trace import _Cost
from memfit.remat import Rates

RATES = Rates(flops_per_s=1e10, bytes_per_s=1e10, op_overhead_s=1e-6, random_elements_per_s=1e7)


def _seconds(fn, rates=RATES, by_dtype=None):
    with _Cost(rates, by_dtype) as cost:
        fn()
    return cost.seconds


def test_dropout_costs_its_draws():
    x = torch.randn(64, 32)
    drawn = _seconds(lambda: torch.ops.aten.native_dropout(x, 0.1, True))
    assert drawn == pytest.approx(64 * 32 / 1e7 + 1e-6)
    # without a random rate, the bytes it moves (input, output, mask)
    plain = Rates(flops_per_s=1e10, bytes_per_s=1e10, op_overhead_s=1e-6)
    assert _seconds(lambda: torch.ops.aten.native_dropout(x, 0.1, True), plain) == pytest.approx(
        (64 * 32 * (4 + 4 + 1)) / 1e10 + 1e-6
    )
    # in eval mode it draws nothing
    assert _seconds(lambda: torch.ops.aten.native_dropout(x, 0.1, False)) < drawn / 10
    # nn.functional.dropout on a CPU tensor runs bernoulli_ and two multiplies: the draws, and their bytes
    functional = _seconds(lambda: torch.nn.functional.dropout(x, 0.1, training=True))
    assert drawn < functional < drawn + 64 * 32 * 4 * 8 / 1e10 + 5e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_costs_its_flops_at_the_float32_rate(dtype):
    q = torch.randn(2, 4, 16, 8, dtype=dtype)
    flops = 2 * 2 * 4 * 16 * 16 * (8 + 8) // 2  # causal: half the blocks
    slow_bf16 = {torch.float32: 1e10, torch.bfloat16: 1e8}  # a bf16 matmul 100x slower, as on this CPU
    seconds = _seconds(
        lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, True),
        by_dtype=slow_bf16,
    )
    moved = 4 * q.numel() * q.element_size() + 2 * 4 * 16 * 4  # q, k, v, out; logsumexp in float32
    assert seconds == pytest.approx(flops / 1e10 + moved / 1e10 + 1e-6)


def test_gathers_cost_their_elements_and_large_outputs_their_fresh_pages():
    """``aten.index`` costs its output's elements, ``index_put`` (any form) its values' at the gather rate; an
    output of ``FRESH_PAGES_FROM`` bytes or more adds its bytes at the fresh-page rate, unless the op wrote it in
    place."""
    from dataclasses import replace

    from memfit.remat.eager.costs import FRESH_PAGES_FROM

    aten = torch.ops.aten
    rates = replace(RATES, gather_elements_per_s=1e8, fresh_page_bytes_per_s=1e9)
    w = torch.empty(8, 128, 512, device="meta")
    ids = torch.zeros(64, dtype=torch.long, device="meta")
    n = 64 * 128 * 512  # a 16 MiB output: no fresh pages
    assert _seconds(lambda: aten.index.Tensor(w, [ids]), rates) == pytest.approx(n / 1e8 + 1e-6)
    values = torch.empty(64, 128, 512, device="meta")
    for put in (aten.index_put, aten.index_put_):
        assert _seconds(lambda put=put: put(w, [ids], values, True), rates) == pytest.approx(n / 1e8 + 1e-6)
    # without the gather rate: the bytes it reads and writes
    moved = (w.numel() + n) * 4 + ids.numel() * 8
    assert _seconds(lambda: aten.index.Tensor(w, [ids])) == pytest.approx(moved / 1e10 + 1e-6)
    # 128 ids: a 32 MiB output, fresh pages
    ids = torch.zeros(128, dtype=torch.long, device="meta")
    assert _seconds(lambda: aten.index.Tensor(w, [ids]), rates) == pytest.approx(
        2 * n / 1e8 + FRESH_PAGES_FROM / 1e9 + 1e-6
    )
    x = torch.empty(FRESH_PAGES_FROM // 4, device="meta")
    streamed = 2 * FRESH_PAGES_FROM / 1e10 + 1e-6
    assert _seconds(lambda: x.mul(2.0), rates) == pytest.approx(streamed + FRESH_PAGES_FROM / 1e9)
    assert _seconds(lambda: x.mul_(2.0), rates) == pytest.approx(streamed)
    assert _seconds(lambda: x[1:].mul(2.0), rates) == pytest.approx(0.5e-6 + streamed - 8 / 1e10)
