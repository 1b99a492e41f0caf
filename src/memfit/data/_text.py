"""A byte-level language-modelling dataset from any text file, with a default corpus found on every machine.

The default corpus is CPython's ``pydoc_data/topics.py`` (the text of ``help()``'s topics, about 0.5 MB of
English prose and code examples), shipped with every Python installation, so the demo runs offline.

Tokens are the file's UTF-8 bytes (vocabulary 256). The first ``1 - val_fraction`` of the bytes are the
training split, the rest the validation split: deterministic, and no window straddles the two. The batch
of step ``k`` is a function of ``(seed, split, k)`` alone, so a resumed run draws exactly the batches an
uninterrupted one would, with no sampler state to save.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = ["VOCAB_SIZE", "TextDataset", "default_corpus"]

VOCAB_SIZE = 256
Split = Literal["train", "val"]
_SPLIT_SALT = {"train": 0, "val": 1}


def default_corpus() -> Path:
    """Path of CPython's ``pydoc_data/topics.py``.

    Raises:
        FileNotFoundError: this Python installation has no ``pydoc_data`` (some minimal distributions strip
            it); pass a text file instead.
    """
    spec = importlib.util.find_spec("pydoc_data")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "topics.py"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "this Python has no pydoc_data/topics.py (the default corpus); pass any text file, e.g. --data FILE"
    )


@dataclass(frozen=True)
class TextDataset:
    """Byte tokens of a text file, split into train and validation.

    Attributes:
        path: the file read.
        train: training tokens, uint8.
        val: validation tokens, uint8.
    """

    path: Path
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_file(cls, path: str | Path | None = None, *, val_fraction: float = 0.1) -> TextDataset:
        """Read ``path`` (default: :func:`default_corpus`) and split it.

        Raises:
            ValueError: ``val_fraction`` outside (0, 1), or a file too short to split.
            FileNotFoundError: the file does not exist.
        """
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        p = Path(path) if path is not None else default_corpus()
        raw = np.frombuffer(p.read_bytes(), dtype=np.uint8)
        n_val = int(len(raw) * val_fraction)
        if len(raw) - n_val < 2 or n_val < 2:
            raise ValueError(f"{p}: {len(raw)} bytes is too short to split into train and validation")
        data = torch.from_numpy(raw.copy())
        return cls(path=p, train=data[: len(raw) - n_val], val=data[len(raw) - n_val :])

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def tokens(self, split: Split) -> torch.Tensor:
        if split not in _SPLIT_SALT:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def batch(
        self, split: Split, step: int, batch_size: int, seq_len: int, *, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of step ``step``: ``batch_size`` random windows, inputs and next-byte targets.

        Args:
            split: ``"train"`` or ``"val"``.
            step: which batch (any non-negative int; the same arguments always give the same batch).
            batch_size: windows per batch.
            seq_len: tokens per window.
            seed: the run's seed.

        Returns:
            ``(x, y)``, both ``(batch_size, seq_len)`` int64, ``y`` shifted one byte right of ``x``.

        Raises:
            ValueError: non-positive sizes, a negative step, or windows longer than the split.
        """
        data = self.tokens(split)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if seq_len + 1 > len(data):
            raise ValueError(f"seq_len={seq_len} needs more than the {len(data)} tokens of the {split} split")
        # a private generator per (seed, split, step): no global RNG touched, nothing to checkpoint
        gen = torch.Generator().manual_seed((seed * 1_000_003 + _SPLIT_SALT[split]) * 1_000_000_007 + step)
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]  # (B, T + 1)
        windows = data[idx].long()
        return windows[:, :-1], windows[:, 1:]
