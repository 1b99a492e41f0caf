"""MemoryReport rendering: JSON round trip, the text table, the PNG plot."""

import json

import pytest
import torch
from torch import nn

from memfit.memory import CATEGORIES, format_bytes, track


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(64, 32)
    with track(model, opt, inputs=x) as t:
        model(x).square().mean().backward()
        t.mark("backward")
        opt.step()
    return t.report


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(5 * 2**30) == "5.00 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"


def test_to_dict_is_json_and_round_trips(report):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["total_peak_bytes"] == report.total_peak_bytes
    assert data["peak_breakdown"] == report.peak_breakdown
    assert data["categories"] == list(CATEGORIES)
    assert data["marks"] == [["backward", report.mark_index("backward")]]
    n = len(data["timeline_ops"])
    assert n == report.n_ops + 2
    for i in (0, report.peak_index, n - 1):
        assert sum(data["timeline"][c][i] for c in CATEGORIES) == int(report.timeline_total[i])
    assert "timeline" not in report.to_dict(timeline=False)


def test_to_json_writes_the_dict(report, tmp_path):
    path = tmp_path / "r.json"
    report.to_json(path, timeline=False)
    assert json.loads(path.read_text()) == report.to_dict(timeline=False)


def test_table_shows_every_category_with_bytes_and_share(report):
    text = report.table()
    lines = text.splitlines()
    for c in CATEGORIES:
        row = next(line for line in lines if line.strip("│ ").startswith(c))
        assert format_bytes(report.peak_breakdown[c]) in row
        share = 100.0 * report.peak_breakdown[c] / report.total_peak_bytes
        assert f"{share:.1f}%" in row
    total = next(line for line in lines if "total" in line)
    assert format_bytes(report.total_peak_bytes) in total and "100.0%" in total
    assert "\x1b[" not in text  # plain text, no terminal colour codes


def test_plot_writes_a_png(report, tmp_path):
    path = report.plot(tmp_path / "timeline.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # an actual picture, not an empty canvas
