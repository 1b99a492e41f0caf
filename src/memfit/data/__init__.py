"""Data that needs no download: byte-level text from any file; by default CPython's own ``pydoc_data`` topics.

Usage::

    ds = memfit.data.TextDataset.from_file()          # default corpus
    x, y = ds.batch("train", step=0, batch_size=16, seq_len=128, seed=0)
"""

from memfit.data._text import VOCAB_SIZE, TextDataset, default_corpus

__all__ = ["VOCAB_SIZE", "TextDataset", "default_corpus"]
