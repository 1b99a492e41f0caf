"""The byte-level dataset: the default corpus, a deterministic split, batches that depend on (seed, step) only."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.data import TextDataset, default_corpus


@pytest.fixture(scope="module")
def ds():
    return TextDataset.from_file()


def test_default_corpus_is_cpythons_pydoc_topics(ds):
    path = default_corpus()
    assert path.name == "topics.py" and path.parent.name == "pydoc_data"
    raw = path.read_bytes()
    assert len(raw) > 300_000
    assert bytes(ds.train.tolist()[:100]) == raw[:100]
    assert torch.equal(torch.cat([ds.train, ds.val]), torch.tensor(list(raw), dtype=torch.uint8))
    assert len(ds.val) == int(len(raw) * 0.1)


@settings(max_examples=25, deadline=None)
@given(
    split=st.sampled_from(["train", "val"]),
    step=st.integers(0, 10**9),
    b=st.integers(1, 8),
    t=st.integers(1, 64),
    seed=st.integers(0, 1000),
)
def test_batches_are_windows_of_the_split_with_shifted_targets(ds, split, step, b, t, seed):
    x, y = ds.batch(split, step, b, t, seed=seed)
    assert x.shape == y.shape == (b, t) and x.dtype == torch.long
    data = bytes(ds.tokens(split).tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        window = bytes([*row_x, row_y[-1]])
        assert window in data  # a contiguous window of this split
        assert row_y[:-1] == row_x[1:]
    x2, y2 = ds.batch(split, step, b, t, seed=seed)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_batches_differ_across_steps_and_seeds_and_leave_global_rng_alone(ds):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = ds.batch("train", 0, 8, 32, seed=0)[0]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(a, ds.batch("train", 1, 8, 32, seed=0)[0])
    assert not torch.equal(a, ds.batch("train", 0, 8, 32, seed=1)[0])


def test_errors(tmp_path, ds):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        TextDataset.from_file(short)
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataset.from_file(val_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        ds.batch("test", 0, 1, 1)
    with pytest.raises(ValueError, match="seq_len"):
        ds.batch("val", 0, 1, len(ds.val))
